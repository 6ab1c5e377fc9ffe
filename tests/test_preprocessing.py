"""One backbone, one preprocessing: training crops, the run directory's eval view and an exported
file's eval view normalise with the same statistics (issue 15: grey Fashion-MNIST/digits runs were
trained and evaluated with 0.449/0.226 from a run directory but 0.286/0.353 from an export)."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.transforms import v2

from dinokit.config import ConfigError, load_config
from dinokit.data import EvalTransform, MultiCropConfig, MultiCropTransform
from dinokit.data.preprocessing import Preprocessing
from dinokit.train.build import build_method, build_multicrop_config, build_preprocessing

TINY_VIT = ("backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2, "
            "in_chans: 1}")
#: Fashion-MNIST's train-split pixel mean and std, the small preset's statistics.
FMNIST = (0.2860, 0.3530)


def _normalize_of(transform: MultiCropTransform) -> tuple[tuple[float, ...], tuple[float, ...]]:
    norms = {(tuple(s.mean), tuple(s.std)) for pipe in [*transform.global_pipelines, transform.local_pipeline]
             for s in pipe.transforms if isinstance(s, v2.Normalize)}
    assert len(norms) == 1
    return norms.pop()


def _stats(t: EvalTransform) -> tuple[tuple[float, ...], tuple[float, ...], int, int, int]:
    return tuple(t.mean), tuple(t.std), t.channels, t.crop_size, t.resize_size


def test_grey_small_preset_trains_with_its_own_statistics_not_generic_grey():
    cfg = load_config("demo")  # crop_preset small, channels 1
    mc = build_multicrop_config(cfg)
    assert mc.channels == 1
    assert mc.mean == pytest.approx((FMNIST[0],)) and mc.std == pytest.approx((FMNIST[1],))  # was 0.449/0.226
    assert _normalize_of(MultiCropTransform(mc)) == (mc.mean, mc.std)


def test_three_imagenet_values_average_to_one_grey_channel():
    mc = MultiCropConfig(channels=1)
    assert mc.mean == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))
    assert mc.std == pytest.approx(((0.229 + 0.224 + 0.225) / 3,))


def test_data_mean_and_std_override_the_preset_everywhere():
    cfg = load_config("demo", ["data.mean=[0.5]", "data.std=[0.25]"])
    mc = build_multicrop_config(cfg)
    assert (mc.mean, mc.std) == ((0.5,), (0.25,))
    assert _stats(build_preprocessing(cfg).eval_transform())[:2] == ((0.5,), (0.25,))
    with pytest.raises(ConfigError, match=r"data\.std"):
        build_multicrop_config(load_config("demo", ["data.std=[0.2, 0.3]"]))


def test_preprocessing_round_trips_and_names_bad_fields():
    p = Preprocessing((0.1,), (0.2,), channels=1, input_size=28)
    assert p.resize_size == 32
    again = Preprocessing.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again == p
    with pytest.raises(ValueError, match="unknown Preprocessing fields"):
        Preprocessing.from_dict({**p.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="std"):
        Preprocessing((0.1,), (0.0,), channels=1)
    x = torch.full((2, 1, 4, 4), 0.3)
    torch.testing.assert_close(p.normalize(x), torch.full_like(x, 1.0))


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with a (untrained) checkpoint of the demo preset: enough for every path."""
    cfg = load_config("demo", ["data.dataset=digits", TINY_VIT, "dino.n_prototypes=16",
                               "heads.hidden_dim=16", "heads.bottleneck_dim=8"])
    torch.manual_seed(0)
    method = build_method(cfg)
    state = {f"method.{k}": v for k, v in method.state_dict().items()}
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"dinokit": {"config": cfg.to_dict()}, "state_dict": state, "global_step": 0},
               tmp_path / "run" / "checkpoints" / "last.ckpt")
    return tmp_path / "run", cfg


def test_training_run_directory_and_export_use_one_preprocessing(run_dir, tmp_path):
    from dinokit.cli._common import load
    from dinokit.export import export_backbone, read_metadata

    run, cfg = run_dir
    train = build_multicrop_config(cfg)
    expected = (train.mean, train.std, 1, 28, 32)
    from_run = load(str(run))
    assert _stats(from_run.transform) == expected
    path = export_backbone(run, tmp_path / "export" / "bb")
    assert Preprocessing.from_dict(read_metadata(path)["preprocessing"]) == build_preprocessing(cfg)
    from_export = load(str(path))
    assert _stats(from_export.transform) == expected
    img = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(from_run.transform(img), from_export.transform(img))  # same pixels in


def test_exports_without_stored_preprocessing_get_the_preset_training_used():
    from dinokit.cli._common import export_preprocessing

    old = {"timm_kwargs": {"in_chans": 1}, "image_size": 28}
    assert export_preprocessing(old) == build_preprocessing(load_config("demo"))
    rgb = export_preprocessing({"timm_kwargs": {}, "image_size": 224})
    assert (rgb.mean, rgb.std, rgb.resize_size) == (MultiCropConfig().mean, MultiCropConfig().std, 256)
