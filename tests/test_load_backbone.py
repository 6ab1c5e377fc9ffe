"""``dinokit.load_backbone`` on each file an export writes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import dinokit
from conftest import tiny_vit
from dinokit.export import export_timm_folder
from dinokit.weights import WeightsError


@pytest.fixture
def folder(tmp_path, seeded):
    bb = tiny_vit().eval()
    return export_timm_folder(bb, tmp_path / "hub"), bb


def test_the_weights_file_of_an_export_folder_loads_with_the_folders_config(folder):
    path, bb = folder
    x = torch.rand(2, 3, 32, 32)
    loaded = dinokit.load_backbone(path / "model.safetensors")
    whole = dinokit.load_backbone(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).cls, bb(x).cls, rtol=0, atol=0)
    assert loaded.timm_name == whole.timm_name == "vit_tiny_patch16_224"
    assert loaded.preprocessing == whole.preprocessing and loaded.preprocessing["mean"]


def test_a_lone_weights_file_still_names_the_missing_metadata(tmp_path):
    lone = tmp_path / "lone" / "model.safetensors"
    lone.parent.mkdir()
    save_file({"w": torch.zeros(2)}, str(lone))
    with pytest.raises(WeightsError, match="no metadata file model.json"):
        dinokit.load_backbone(lone)


def test_another_weights_file_in_the_folder_is_not_taken_for_the_folders(folder):
    path, _ = folder
    other = path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(WeightsError, match="no metadata file other.json"):
        dinokit.load_backbone(other)
