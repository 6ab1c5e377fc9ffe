"""ONNX graphs of dinokit backbones, and features computed from them with onnxruntime.

:func:`export_onnx` writes one graph with the input ``images`` (float32 ``[batch, C, H, W]``,
normalised as the run normalised its crops) and the named outputs ``cls`` (``[batch, D]``: the CLS
or pooled embedding), ``patches`` (``[batch, N, D]``: patch tokens, or the cells of a CNN's last
feature map) and, for ViTs with register tokens, ``registers`` (``[batch, R, D]``). The batch is
dynamic; so is the image size where the architecture allows it: any multiple of the patch size for
ViTs (the absolute position embedding is resampled in the graph as timm does, DINOv3's rotary
embedding is computed from the patch grid), any size for CNNs. The graph comes from
``torch.onnx.export``'s ``torch.export``-based exporter (opset 18 or newer).

The preprocessing the inputs need is stored in the model's ``metadata_props``: ``dinokit`` holds
the whole export metadata as JSON (architecture, patch size, outputs and ``preprocessing``: mean,
std, channels, input size, crop fraction, interpolation), and ``mean``, ``std``, ``input_size``,
``resize_size``, ``patch_size`` are repeated as plain entries for serving code that reads one key.

``precision="fp16"`` stores the weights and runs the graph in float16 between a cast of the input
and a cast of the outputs back to float32, so callers feed and read float32 either way.

:class:`OnnxFeatures` runs such a file with onnxruntime (no torch in the inference loop) and
:class:`OnnxFeatures` runs such a file for :func:`dinokit.embed.embed`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dinokit.backbones import Backbone
from dinokit.interop.extras import require
from dinokit.interop.staging import staged_file

PRECISIONS = ("fp32", "fp16")
DEFAULT_OPSET = 18
#: largest difference from torch :func:`export_onnx` accepts when it checks the graph it wrote
#: (fp16: float16 weights and activations against the float32 torch model).
VERIFY_ATOL = {"fp32": 1e-3, "fp16": 5e-2}
METADATA_KEY = "dinokit"


class _Features(nn.Module):
    """``images -> (cls, patches[, registers])``: the backbone's feature interface as plain outputs."""

    def __init__(self, backbone: Backbone, dtype: torch.dtype):
        super().__init__()
        self.backbone, self.dtype = backbone, dtype
        self.registers = bool(backbone.num_registers)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.backbone(images.to(self.dtype))
        feats = [out.cls, out.patches]
        if self.registers:
            feats.append(out.registers)
        return tuple(f.float() for f in feats)


def _traceable_dinov3_embed(rope: nn.Module, shape: Any = None, dtype: torch.dtype | None = None) -> Tensor:
    """timm's ``RotaryEmbeddingDinoV3.get_embed`` for an ``(H, W)`` patch grid, with the coordinate
    normalisation (``(i + 0.5) / H``, then ``2 c - 1``) divided by a tensor rather than by
    ``float(H)``, which ``torch.export`` would freeze at the example size."""
    h, w = shape
    device = rope.periods.device
    axes = []
    for n in (h, w):
        i = torch.arange(n, device=device, dtype=torch.float32)
        axes.append((i + 0.5 + rope.grid_offset) / torch.ones_like(i).sum())
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    coords = (2.0 * grid - 1.0).flatten(0, 1)
    sin, cos = rope._get_pos_embed_from_coords(coords)
    embed = torch.cat([sin, cos], dim=-1)
    return embed if dtype is None else embed.to(dtype)


@contextlib.contextmanager
def _traceable_sizes(backbone: Backbone) -> Iterator[None]:
    """Within the block, every DINOv3 rotary embedding of the backbone computes its patch
    coordinates with tensor arithmetic (:func:`_traceable_dinov3_embed`), so the exported graph
    keeps the image size dynamic; the modules are restored after."""
    ropes = [m for m in backbone.modules() if type(m).__name__ == "RotaryEmbeddingDinoV3"]
    for rope in ropes:
        if rope.normalize_coords != "separate" or rope.grid_indexing != "ij":
            raise ValueError(f"a dynamic image size needs DINOv3's own rotary coordinates (normalize_coords="
                             f"{rope.normalize_coords!r}, grid_indexing={rope.grid_indexing!r}); export with "
                             "a fixed size (dynamic_size=False, --static-size)")
        rope.get_embed = types.MethodType(_traceable_dinov3_embed, rope)
    try:
        yield
    finally:
        for rope in ropes:
            del rope.get_embed


def _check_against_torch(module: _Features, path: Path, sizes: list[int], chans: int, atol: float) -> float:
    """Run the written graph with onnxruntime at each size and compare every output with the torch
    module; raises ``RuntimeError`` naming the output and size where they differ by more than
    ``atol``. Returns the largest difference."""
    ort = require("onnxruntime", "onnx", "checking an ONNX export")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for size in sizes:
        x = torch.randn(1, chans, size, size, generator=gen)
        with torch.no_grad():
            want = [t.numpy() for t in module(x)]
        got = session.run(None, {"images": x.numpy()})
        for name, a, b in zip([o.name for o in session.get_outputs()], got, want):
            diff = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
            worst = max(worst, diff)
            if not diff <= atol:
                raise RuntimeError(f"the ONNX graph's {name!r} differs from torch by {diff:.3g} at {size} px "
                                   f"(tolerance {atol:g}); export with a fixed size (--static-size) or "
                                   "report it")
    return worst


def _output_names(backbone: Backbone) -> list[str]:
    return ["cls", "patches", *(["registers"] if backbone.num_registers else [])]


def _dynamic_shapes(backbone: Backbone, dynamic_size: bool) -> dict[str, Any]:
    dim = torch.export.Dim
    shapes: dict[int, Any] = {0: dim("batch", min=1, max=1 << 16)}
    if dynamic_size:
        ps = backbone.patch_size
        if ps:
            shapes[2] = ps * dim("height_patches", min=1, max=1 << 12)
            shapes[3] = ps * dim("width_patches", min=1, max=1 << 12)
        else:
            shapes[2] = dim("height", min=32, max=1 << 14)
            shapes[3] = dim("width", min=32, max=1 << 14)
    return {"images": shapes}


def export_onnx(source: Any, path: str | Path, *, which: str = "teacher", opset: int = DEFAULT_OPSET,
                precision: str = "fp32", dynamic_size: bool = True, image_size: int | None = None,
                preprocessing: dict[str, Any] | None = None, verify: bool = True) -> Path:
    """Write ``path`` (``.onnx`` added when missing): the backbone of ``source`` (a method, a
    Backbone, a training checkpoint or a run directory) as an ONNX graph with the outputs ``cls``,
    ``patches`` (and ``registers``), a dynamic batch and, with ``dynamic_size``, a dynamic image size.

    ``image_size``: the example size the graph is traced at (default: the run's input size); the
    only size the graph takes when ``dynamic_size=False``. ``verify``: before the file takes its
    name, onnxruntime runs it at that size and (dynamic) at a larger one and every output is compared
    with torch (:data:`VERIFY_ATOL`); a graph that differs is never written. Written to a temporary
    file and renamed.
    """
    from dinokit.export import _metadata, _resolve

    onnx = require("onnx", "onnx", "ONNX export")
    require("onnxscript", "onnx", "ONNX export")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be an int >= {DEFAULT_OPSET} (torch's ONNX exporter), got {opset!r}")
    e = _resolve(source, which, timm_name=None, timm_kwargs=None, preprocessing=preprocessing)
    backbone = e.backbone.eval()
    pre = e.preprocessing
    size = int(image_size or pre.get("input_size") or 224)
    ps = backbone.patch_size
    if ps and size % ps:
        raise ValueError(f"image_size {size} is not a multiple of the patch size {ps}")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    if dtype != torch.float32:  # never change the caller's backbone
        backbone = copy.deepcopy(backbone)
    module = _Features(backbone, dtype).to(dtype).eval()
    chans = int(pre.get("channels") or backbone.in_chans or 3)
    example = torch.randn(2, chans, size, size)
    names = _output_names(backbone)
    out = Path(path) if Path(path).suffix == ".onnx" else Path(f"{path}.onnx")
    with torch.no_grad(), _traceable_sizes(backbone):
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                    input_names=["images"], output_names=names,
                                    dynamic_shapes=_dynamic_shapes(backbone, dynamic_size),
                                    optimize=True, verbose=False)
    model = program.model_proto
    meta = {**_metadata(e, which), "outputs": names, "precision": precision, "opset": opset,
            "dynamic_image_size": bool(dynamic_size), "example_image_size": size}
    from dinokit.data.preprocessing import Preprocessing

    p = Preprocessing.from_dict(dict(pre))
    props = {METADATA_KEY: json.dumps(meta), "mean": json.dumps(list(p.mean)), "std": json.dumps(list(p.std)),
             "input_size": str(p.input_size), "resize_size": str(p.resize_size),
             "patch_size": str(ps or ""), "channels": str(p.channels)}
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    model.doc_string = (f"dinokit {e.arch} backbone: images [batch, {chans}, H, W] normalised with the "
                        f"metadata's mean/std -> {', '.join(names)}")
    with staged_file(out) as tmp:
        onnx.save(model, str(tmp))
        if verify:
            step = ps or 32
            sizes = [size, size + 2 * step] if dynamic_size else [size]
            _check_against_torch(module, tmp, sizes, chans, VERIFY_ATOL[precision])
    return out


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The ``dinokit`` metadata of an exported ``.onnx`` file (without loading its weights)."""
    onnx = require("onnx", "onnx", "reading an ONNX export")
    from dinokit.weights import WeightsError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and others for files that are not ONNX
        raise WeightsError(f"{path} is not a readable ONNX file ({type(err).__name__}: {err})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise WeightsError(f"{path} has no dinokit metadata (export it with dinokit export --format onnx)")
    return json.loads(props[METADATA_KEY])


class OnnxFeatures:
    """An exported ``.onnx`` backbone run with onnxruntime: ``features(images)`` takes float32
    ``[B, C, H, W]`` (numpy) and returns ``{"cls": [B, D], "patches": [B, N, D], ...}`` numpy arrays.

    ``metadata`` is the export's metadata; ``transform`` its evaluation view (for image files).
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None):
        ort = require("onnxruntime", "onnx", "ONNX inference")
        self.path = Path(path)
        self.metadata = read_onnx_metadata(self.path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(self.path), options,
                                            providers=providers or ["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def transform(self) -> Any:
        from dinokit.export import eval_transform

        return eval_transform(self.metadata["preprocessing"])

    def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(images, dtype=np.float32)
        outs = self.session.run(self.output_names, {"images": x})
        return dict(zip(self.output_names, outs))
