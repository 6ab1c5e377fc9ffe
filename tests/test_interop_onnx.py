"""ONNX export: onnxruntime gives the torch features (named outputs cls / patches / registers) at two
image sizes and two batch sizes for a ViT with registers, a DINOv3 RoPE ViT (timm Eva) and a CNN;
the preprocessing travels in the model's metadata; `dinokit embed` runs the .onnx file; a missing
extra is one line and exit 2."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from dinokit.backbones import build_backbone
from dinokit.cli import main
from dinokit.interop.onnx import OnnxFeatures, export_onnx, read_onnx_metadata

TINY = dict(embed_dim=32, depth=2, num_heads=2)
PRE = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "channels": 3, "input_size": 32,
       "crop_fraction": 0.875, "interpolation": "bicubic"}
#: fp32 tolerance of onnxruntime against torch (measured ~5e-6 on these models).
ATOL = 1e-4


def _randomised(bb):
    """Random non-trivial weights: LayerScale gains, biases and tokens away from their init."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in bb.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return bb.eval()


BACKBONES = {
    # timm's DINOv2 ViT with 4 registers; image size 28 is the position embedding's own grid
    "vit-registers": (lambda: build_backbone("vit_small_patch14_reg4_dinov2",
                                             encoder_kwargs={**TINY, "img_size": 28}), [28, 42]),
    "dinov3-rope": (lambda: build_backbone("vit_small_patch16_dinov3", encoder_kwargs=TINY), [32, 48]),
    "cnn": (lambda: build_backbone("resnet10t"), [64, 96]),
}


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_onnxruntime_gives_the_torch_features(kind, tmp_path):
    build, sizes = BACKBONES[kind]
    torch.manual_seed(0)
    bb = _randomised(build())
    path = export_onnx(bb, tmp_path / "model", preprocessing={**PRE, "input_size": sizes[0]}, verify=False)
    assert path.name == "model.onnx" and not list(tmp_path.glob(".*"))  # no temporary left
    runner = OnnxFeatures(path)
    expected = ["cls", "patches"] + (["registers"] if bb.num_registers else [])
    assert runner.output_names == expected
    worst = 0.0
    for size in sizes:
        for batch in (1, 3):
            x = torch.randn(batch, 3, size, size)
            with torch.no_grad():
                ref = bb(x)
            got = runner.features(x.numpy())
            for name in expected:
                want = getattr(ref, name).numpy()
                assert got[name].shape == want.shape, (name, size, batch)
                diff = float(np.abs(got[name] - want).max())
                worst = max(worst, diff)
                assert diff < ATOL, f"{kind} {name} at {size}px batch {batch}: max abs diff {diff:.2e}"
    print(f"{kind}: max abs diff onnxruntime vs torch {worst:.2e}")


def test_a_graph_frozen_at_the_example_size_is_caught_before_it_is_written(tmp_path, monkeypatch):
    # timm computes DINOv3's rotary coordinates with float(H): without dinokit's traceable version
    # torch.export freezes them at the example size, and the check against torch refuses the graph.
    import contextlib

    import dinokit.interop.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "_traceable_sizes", lambda backbone: contextlib.nullcontext())
    bb = _randomised(build_backbone("vit_small_patch16_dinov3", encoder_kwargs=TINY))
    with pytest.raises(RuntimeError, match="differs from torch"):
        export_onnx(bb, tmp_path / "frozen.onnx", preprocessing=PRE)
    assert not list(tmp_path.iterdir())  # neither the file nor a temporary


def test_metadata_fp16_and_static_size(tmp_path):
    torch.manual_seed(0)
    bb = _randomised(build_backbone("vit_small_patch16_dinov3", encoder_kwargs=TINY))
    path = export_onnx(bb, tmp_path / "half.onnx", preprocessing=PRE, precision="fp16", dynamic_size=False)
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["mean"]) == PRE["mean"] and json.loads(props["std"]) == PRE["std"]
    assert props["input_size"] == "32" and props["resize_size"] == "37" and props["patch_size"] == "16"
    meta = read_onnx_metadata(path)
    assert meta["preprocessing"]["mean"] == PRE["mean"] and meta["precision"] == "fp16"
    assert meta["outputs"] == ["cls", "patches", "registers"] and not meta["dynamic_image_size"]
    runner = OnnxFeatures(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = bb(x).cls.numpy()
    got = runner.features(x.numpy())["cls"]
    assert got.dtype == np.float32 and np.abs(got - ref).max() < 5e-2  # float16 compute
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error for a size the graph fixes
        runner.features(np.zeros((1, 3, 48, 48), np.float32))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    args = ["train", "--config", "demo", "data.dataset=digits", "data.limit=64", "data.batch_size=32",
            "data.num_workers=0", "trainer.epochs=1", "trainer.progress=false",
            "backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2, "
            "in_chans: 1}", "dino.n_prototypes=32", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
            f"trainer.output_dir={out}", "trainer.run_name=vit"]
    assert main(args) == 0
    return out / "vit"


def test_cli_export_onnx_and_embed_with_onnxruntime(digits_run, tmp_path, capsys):
    onnx_path = tmp_path / "bb.onnx"
    assert main(["export", "--checkpoint", str(digits_run), "--output", str(tmp_path / "bb"),
                 "--format", "onnx"]) == 0
    assert "outputs cls, patches" in capsys.readouterr().out
    common = ["--data", "digits", "--limit", "20", "--no-progress", "--batch-size", "8"]
    assert main(["embed", "--checkpoint", str(onnx_path), "--output", str(tmp_path / "o"), *common]) == 0
    assert main(["embed", "--checkpoint", str(digits_run), "--output", str(tmp_path / "t"), *common,
                 "--device", "cpu"]) == 0
    a, b = np.load(tmp_path / "o.npy"), np.load(tmp_path / "t.npy")
    assert a.shape == b.shape == (20, 32)
    assert np.abs(a - b).max() < ATOL
    assert main(["embed", "--checkpoint", str(onnx_path), "--output", str(tmp_path / "m"), *common,
                 "--pool", "mean"]) == 0
    assert not np.allclose(np.load(tmp_path / "m.npy"), a)


def test_missing_extra_and_bad_options_are_one_line_exit_2(digits_run, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["export", "--checkpoint", str(digits_run), "--output", str(tmp_path / "x"), "--format", "onnx",
              "--opset", "11"])
    assert e.value.code == 2 and "--opset: must be >= 18" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the extra were not installed
    code = main(["export", "--checkpoint", str(digits_run), "--output", str(tmp_path / "x"), "--format", "onnx"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert 'pip install "dinokit[onnx]"' in err
