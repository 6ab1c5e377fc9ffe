"""transformers folders: AutoModel.from_pretrained and pipeline("image-feature-extraction") give
dinokit's features for DINOv2 ViTs (with and without registers, timm's own or dinokit's) and
DINOv3 RoPE ViTs with random weights; other architectures are refused with one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.backbones import build_backbone
from dinokit.cli import main
from dinokit.export import eval_transform
from dinokit.interop.hf import UnsupportedForHFError, export_hf_folder

transformers = pytest.importorskip("transformers")

TINY = dict(embed_dim=32, depth=2, num_heads=2)
PRE = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "channels": 3, "input_size": 28,
       "crop_fraction": 0.875, "interpolation": "bicubic"}
#: fp32 tolerance of transformers against dinokit (measured <= 1e-6 on these models).
ATOL = 1e-4

CASES = {
    # name: (timm model, registers added by dinokit, transformers class, image sizes with exact parity)
    "dinov2": ("vit_small_patch14_dinov2", 0, "Dinov2Model", [28]),
    "dinov2-reg4": ("vit_small_patch14_reg4_dinov2", 0, "Dinov2WithRegistersModel", [28, 42]),
    "dinov2+dinokit-registers": ("vit_small_patch14_dinov2", 2, "Dinov2WithRegistersModel", [28, 42]),
    "dinov3": ("vit_small_patch16_dinov3", 0, "DINOv3ViTModel", [32, 48]),
    "dinov3-qkvb": ("vit_small_patch16_dinov3_qkvb", 0, "DINOv3ViTModel", [32, 48]),
}


def _backbone(name, registers, img_size):
    torch.manual_seed(0)
    kw = {**TINY, "img_size": img_size} if "dinov2" in name else TINY
    bb = build_backbone(name, num_registers=registers, encoder_kwargs=kw)
    bb.enable_mask_token()
    with torch.no_grad():  # move every tensor away from its init (LayerScale 1e-5, zero biases)
        for p in bb.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return bb.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_automodel_gives_dinokit_features(case, tmp_path):
    name, registers, cls_name, sizes = CASES[case]
    pre = {**PRE, "input_size": sizes[0]}
    bb = _backbone(name, registers, 56 if case == "dinov2" else sizes[0])  # dinov2: a 56 px embedding
    folder = export_hf_folder(bb, tmp_path / "hf", preprocessing=pre)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # written under a temporary name
    model = transformers.AutoModel.from_pretrained(folder).eval()
    assert type(model).__name__ == cls_name
    meta = json.loads((folder / "dinokit.json").read_text())
    assert meta["transformers_class"] == cls_name and meta["preprocessing"]["mean"] == PRE["mean"]
    r = bb.num_registers
    worst = 0.0
    for size in sizes:
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref = bb(x)
            hidden = model(pixel_values=x).last_hidden_state
        parts = [(ref.cls, hidden[:, 0]), (ref.patches, hidden[:, 1 + r:])]
        if r:
            parts.append((ref.registers, hidden[:, 1:1 + r]))
        for want, got in parts:
            diff = float((want - got).abs().max())
            worst = max(worst, diff)
            assert diff < ATOL, f"{case} at {size} px: max abs diff {diff:.2e}"
    print(f"{case}: max abs diff transformers vs dinokit {worst:.2e}")


@pytest.mark.parametrize("case", ["dinov2-reg4", "dinov3"])
def test_pipeline_preprocesses_and_embeds_as_dinokit(case, tmp_path):
    name, registers, _, sizes = CASES[case]
    pre = {**PRE, "input_size": sizes[0]}
    bb = _backbone(name, registers, sizes[0])
    folder = export_hf_folder(bb, tmp_path / "hf", preprocessing=pre)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == PRE["mean"] and processor["crop_size"]["height"] == sizes[0]
    pipe = transformers.pipeline("image-feature-extraction", model=str(folder))
    rng = np.random.default_rng(0)
    resize = round(sizes[0] / PRE["crop_fraction"])
    # an image already at the resize size: both sides then only centre crop, scale and normalise
    img = Image.fromarray(rng.integers(0, 256, (resize, resize, 3), dtype=np.uint8))
    got = pipe(img, return_tensors=True)[0]
    with torch.no_grad():
        ref = bb(eval_transform(pre)(img).unsqueeze(0))
    diff = max(float((got[0] - ref.cls[0]).abs().max()),
               float((got[1 + bb.num_registers:] - ref.patches[0]).abs().max()))
    assert diff < ATOL, f"pipeline vs dinokit: max abs diff {diff:.2e}"


def test_other_architectures_are_refused(tmp_path):
    with pytest.raises(UnsupportedForHFError, match="supported: DINOv2-family"):
        export_hf_folder(build_backbone("resnet10t"), tmp_path / "hf", preprocessing=PRE)
    assert not list(tmp_path.iterdir())


def test_cli_unsupported_architecture_is_one_line_exit_2(tmp_path, capsys):
    run = ["train", "--config", "demo_cnn", "data.dataset=digits", "data.limit=32", "data.batch_size=16",
           "data.num_workers=0", "crops.n_local=0", "trainer.epochs=1", "trainer.progress=false",
           "dino.n_prototypes=16", "heads.hidden_dim=16", "heads.bottleneck_dim=8",
           f"trainer.output_dir={tmp_path}", "trainer.run_name=cnn"]
    assert main(run) == 0
    capsys.readouterr()
    code = main(["export", "--checkpoint", str(tmp_path / "cnn"), "--output", str(tmp_path / "hf"),
                 "--format", "hf"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--format hf cannot export" in err and "DINOv3ViTModel" in err
    assert not (tmp_path / "hf").exists()


def test_missing_extra_names_it(tmp_path, monkeypatch):
    import sys

    from dinokit.interop.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    bb = _backbone("vit_small_patch14_dinov2", 0, 28)

    with pytest.raises(MissingExtraError, match=r'pip install "dinokit\[hf\]"'):
        export_hf_folder(bb, tmp_path / "hf")
