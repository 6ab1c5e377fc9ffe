"""DINO's multi-crop recipe on a whole batch at once (Caron et al. 2021, Sec. 3.1; BYOL's colour
recipe), for uint8 images decoded on CPU workers and augmented where the model runs.

The random parameters are those of the per-sample :class:`~dinokit.data.MultiCropTransform`
(torchvision's ``RandomResizedCrop``, ``RandomHorizontalFlip``, ``ColorJitter`` with a random order
of its four operations, ``RandomGrayscale``, ``GaussianBlur``, ``RandomSolarize``), drawn for every
(view, image) pair from one CPU generator, so a seed gives the same crops on CPU and GPU. The work
is batched: every crop of one resolution comes from one ``torchvision.ops.roi_align`` call over
per-sample boxes (``sampling_ratio=-1`` averages ``ceil(crop / output)``-squared bilinear samples
per output pixel: antialiased like the per-sample resize, but bilinear where it is bicubic); the
colour operations run on contiguous groups of crops that share an order; blur and solarisation
run only on the crops that draw them.

Output: ``{"global_views": [Tensor B x C x G x G] * n_global, "local_views": [Tensor B x C x L x L]
* n_local}``, float32, normalised, on the images' device (the collate's layout).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import permutations
from typing import Any

import torch
import torch.nn.functional as nnf
from PIL import Image
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as F

from dinokit.data.multicrop import LUMA, SOLARIZE_THRESHOLD, MultiCropConfig, to_image_tensor, to_l_or_rgb
from dinokit.data.preprocessing import Preprocessing

#: torchvision's ``rgb_to_grayscale`` weights (what ``ColorJitter`` and ``RandomGrayscale`` use).
GREY = (0.2989, 0.587, 0.114)
#: ColorJitter's operations, in the index order of its random permutation.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


# --------------------------------------------------------------------------- random parameters
@dataclass
class CropParams:
    """Per-crop random parameters of ``N`` crops (CPU tensors; rows follow the output views).

    ``boxes`` [N, 4] (top, left, height, width) in source pixels; ``flip``, ``jitter``,
    ``grey``, ``blur``, ``solarize`` [N] bool; ``factors`` [N, 4] (brightness, contrast,
    saturation, hue); ``order`` [N, 4] a permutation of the four colour operations; ``sigma`` [N].
    """

    boxes: Tensor
    flip: Tensor
    jitter: Tensor
    factors: Tensor
    order: Tensor
    grey: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor


def sample_boxes(sizes: Tensor, scale: Sequence[float], ratio: Sequence[float],
                 generator: torch.Generator | None = None, attempts: int = 10) -> Tensor:
    """torchvision's ``RandomResizedCrop`` boxes for images of ``sizes`` [N, 2] (height, width):
    up to ``attempts`` tries of an area fraction ``U(scale)`` and a log-uniform aspect ratio in
    ``ratio``, the first that fits wins; else the centre crop of the clamped aspect ratio.
    Returns int64 [N, 4] (top, left, height, width)."""
    n = sizes.shape[0]
    h_img, w_img = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    area = h_img * w_img
    target = area * torch.empty(n, attempts, dtype=torch.float64).uniform_(
        scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, attempts, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)
    found = ok.any(1)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    hi, wi = h_img.squeeze(1), w_img.squeeze(1)
    top = torch.floor(u[:, 0] * (hi - h + 1)).clamp(max=hi - h)
    left = torch.floor(u[:, 1] * (wi - w + 1)).clamp(max=wi - w)
    # fallback: the whole image, cut to the nearest allowed aspect ratio, centred
    in_ratio = wi / hi
    fw = torch.where(in_ratio > ratio[1], torch.round(hi * ratio[1]), wi)
    fh = torch.where(in_ratio < ratio[0], torch.round(wi / ratio[0]), hi)
    h, w = torch.where(found, h, fh), torch.where(found, w, fw)
    top = torch.where(found, top, torch.div(hi - fh, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(wi - fw, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], 1).long()


def sample_params(cfg: MultiCropConfig, sizes: Tensor, scale: Sequence[float], blur_p: Tensor,
                  solarize_p: Tensor, generator: torch.Generator | None = None) -> CropParams:
    """Every random parameter of ``N = len(sizes)`` crops; ``blur_p``/``solarize_p`` [N] per crop.
    Distributions as in torchvision: jitter factors ``U(max(0, 1 - b), 1 + b)`` (hue ``U(-h, h)``),
    operations in a uniformly random order, blur sigma ``U(blur_sigma)``."""
    n = sizes.shape[0]
    g = generator
    boxes = sample_boxes(sizes, scale, cfg.crop_ratio, g)

    def coin(p: float | Tensor) -> Tensor:
        return torch.rand(n, generator=g) < p

    flip = coin(cfg.flip_p)
    b, c, s, h = cfg.jitter
    if cfg.channels == 1:
        s, h = 0.0, 0.0
    jitter = coin(cfg.jitter_p) if any((b, c, s, h)) else torch.zeros(n, dtype=torch.bool)
    u = torch.rand(n, 4, generator=g)
    lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
    hi = torch.tensor([1 + b, 1 + c, 1 + s, h])
    factors = lo + u * (hi - lo)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
    off = torch.tensor([b == 0, c == 0, s == 0, h == 0])
    factors = torch.where(off | ~jitter[:, None], identity, factors)
    order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)
    grey = coin(cfg.grayscale_p) if cfg.channels == 3 else torch.zeros(n, dtype=torch.bool)
    blur = coin(blur_p)
    sigma = torch.empty(n).uniform_(cfg.blur_sigma[0], cfg.blur_sigma[1], generator=g)
    solarize = coin(solarize_p)
    return CropParams(boxes, flip, jitter, factors, order, grey, blur, sigma, solarize)


# ---------------------------------------------------------------------------- batched colour ops
def _grey(x: Tensor) -> Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] with torchvision's weights."""
    return (GREY[0] * x[:, 0:1]).add_(x[:, 1:2], alpha=GREY[1]).add_(x[:, 2:3], alpha=GREY[2])


def _col(f: Tensor) -> Tensor:
    return f.view(-1, 1, 1, 1)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * _col(f)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    mean = (_grey(x) if x.shape[1] == 3 else x).mean(dim=(1, 2, 3), keepdim=True)
    return (x * _col(f)).add_(mean * _col(1 - f)).clamp_(0.0, 1.0)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return (x * _col(f)).add_(_grey(x) * _col(1 - f)).clamp_(0.0, 1.0)


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    """Rotate the hue of [N, 3, H, W] in [0, 1] by ``f`` [N] turns, as an HSV round trip: value
    (max) and chroma (max - min) are kept, ``6 h = (next - previous channel of the max) / chroma +
    2 * index of the max`` (mod 6); back with ``c_n = max - chroma * clamp(min(k, 4 - k), 0, 1)``,
    ``k = (n + 6 h) mod 6``, n = 5, 3, 1 for R, G, B."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = x.amax(1, keepdim=True)
    chroma = maxc - x.amin(1, keepdim=True)
    is_r = r == maxc
    is_g = (g == maxc) & ~is_r
    num = torch.where(is_r, g - b, torch.where(is_g, (b - r).add_(chroma, alpha=2.0),
                                                (r - g).add_(chroma, alpha=4.0)))
    h6 = num.div_(chroma.clamp_min(1e-12)).add_(6.0 * f.view(-1, 1, 1, 1) + 6.0)  # > 0 for |f| <= 0.5
    k = torch.fmod(h6 + _HUE_OFFSETS.to(x), 6.0)
    k = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return k.mul_(chroma).neg_().add_(maxc)


_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """torchvision's 1-D Gaussian kernels ``exp(-t^2 / 2 sigma^2)``, ``t = -(k-1)/2 .. (k-1)/2``,
    normalised: [N, kernel_size] for ``sigma`` [N]."""
    half = kernel_size // 2
    t = torch.arange(-half, half + 1, device=sigma.device, dtype=sigma.dtype)
    k = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    return k / k.sum(1, keepdim=True)


def _blur_rows(x: Tensor, k: Tensor) -> Tensor:
    """Blur the last dim of [N, C, H, W] with kernel ``k[n]`` (reflect padding): one depthwise
    ``conv1d`` over all N * C * H rows."""
    n, c, h, w = x.shape
    half = k.shape[1] // 2
    rows = nnf.pad(x.reshape(1, n * c * h, w), (half, half), mode="reflect")
    weight = k.repeat_interleave(c * h, 0).unsqueeze(1)  # [N * C * H, 1, k]
    return nnf.conv1d(rows, weight, groups=n * c * h).view(n, c, h, w)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur of [N, C, H, W] with one ``sigma`` [N] per image, reflect padding
    (torchvision's ``gaussian_blur`` with ``kernel_size`` x ``kernel_size`` and sigma (s, s))."""
    k = gaussian_kernels(sigma.to(x), kernel_size)
    y = _blur_rows(x, k)
    return _blur_rows(y.transpose(-1, -2), k).transpose(-1, -2)


# ------------------------------------------------------------------------------------- pipeline
def stack_uint8(images: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """uint8 ``[B, C, H, W]`` or a list of uint8 ``[C, H, W]`` / ``[H, W]`` (sizes may differ) ->
    (uint8 ``[B, C', H_max, W_max]``, sizes int64 [B, 2]). Smaller images are padded by repeating
    their last row and column (bilinear sampling at a crop's border then reads only the image)."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.dtype != torch.uint8 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 [B, C, H, W] with C in (1, 3), got "
                             f"{images.dtype} {tuple(images.shape)}")
        x = images
        sizes = torch.tensor([list(x.shape[-2:])] * x.shape[0], dtype=torch.long)
    else:
        items = [im.unsqueeze(0) if isinstance(im, Tensor) and im.ndim == 2 else im for im in images]
        if not items:
            raise ValueError("images is empty")
        for im in items:
            if not (isinstance(im, Tensor) and im.ndim == 3 and im.dtype == torch.uint8
                    and im.shape[0] in (1, 3)):
                what = f"{im.dtype} {tuple(im.shape)}" if isinstance(im, Tensor) else type(im).__name__
                raise ValueError(f"images must be uint8 tensors [C, H, W] with C in (1, 3), got {what}")
        c = max(im.shape[0] for im in items)
        sizes = torch.tensor([list(im.shape[-2:]) for im in items], dtype=torch.long)
        hm, wm = int(sizes[:, 0].max()), int(sizes[:, 1].max())
        x = torch.empty(len(items), c, hm, wm, dtype=torch.uint8, device=items[0].device)
        for i, im in enumerate(items):
            h, w = im.shape[-2:]
            x[i, :, :h, :w] = im
            if w < wm:
                x[i, :, :h, w:] = x[i, :, :h, w - 1 : w]
            if h < hm:
                x[i, :, h:, :] = x[i, :, h - 1 : h, :]
    return x, sizes


class BatchedMultiCrop:
    """DINO's multi-crop recipe on a batch of uint8 images as batched tensor ops (module docstring).

    ``BatchedMultiCrop(config)(images, generator)``: ``images`` uint8 ``[B, C, H, W]`` or a list of
    uint8 ``[C, H, W]`` (any sizes; C = 1 or 3, converted to ``config.channels``), on any device;
    ``sizes`` [B, 2] gives the true (height, width) of edge-padded images (:func:`collate_uint8`).
    Random parameters come from ``generator`` (a CPU ``torch.Generator``; None = torch's global
    one), so they do not depend on the device. Work runs on ``device`` (default: the images').

    ``resize``: how crops are cut and resized. ``"roi_align"``: every crop of a resolution in one
    ``roi_align`` call (bilinear, ``ceil(crop / output)``-squared samples per output pixel); the
    choice on GPUs. ``"resize"``: one antialiased uint8 ``resized_crop`` per crop with
    ``config.interpolation`` (torch's vectorised uint8 kernels; the per-sample recipe's exact
    resize), the fast choice on CPU. ``"auto"``: ``roi_align`` on CUDA, else ``resize``.
    """

    def __init__(self, config: MultiCropConfig | dict[str, Any] | None = None,
                 device: torch.device | str | None = None, resize: str = "auto"):
        if isinstance(config, dict):
            config = MultiCropConfig.from_dict(config)
        if config is not None and not isinstance(config, MultiCropConfig):
            raise TypeError(f"config must be a MultiCropConfig, a dict or None, got {type(config).__name__}")
        if resize not in ("auto", "roi_align", "resize"):
            raise ValueError(f"resize must be 'auto', 'roi_align' or 'resize', got {resize!r}")
        self.config = cfg = config or MultiCropConfig()
        self.preprocessing = Preprocessing.from_multicrop(cfg)
        self.device = torch.device(device) if device is not None else None
        self.resize = resize
        blur = [cfg.blur_p[0]] + [cfg.blur_p[1]] * (cfg.n_global - 1)
        self._global_blur = torch.tensor(blur)
        self._global_solarize = torch.tensor([cfg.solarize_p if i == 1 else 0.0 for i in range(cfg.n_global)])

    def __call__(self, images: Tensor | Sequence[Tensor], generator: torch.Generator | None = None,
                 sizes: Tensor | None = None) -> dict[str, list[Tensor]]:
        cfg = self.config
        x, found_sizes = stack_uint8(images)
        sizes = found_sizes if sizes is None else torch.as_tensor(sizes, dtype=torch.long).cpu()
        if sizes.shape != (x.shape[0], 2):
            raise ValueError(f"sizes must be [B, 2] = [{x.shape[0]}, 2], got {tuple(sizes.shape)}")
        x = x.to(self.device or x.device, non_blocking=True)
        if x.shape[1] == 3 and cfg.channels == 1:  # luma, rounded as PIL's convert("L")
            x = (LUMA[0] * x[:, 0:1]).add_(x[:, 1:2], alpha=LUMA[1]).add_(x[:, 2:3], alpha=LUMA[2])
            x = x.round_().to(torch.uint8)
        method = self.resize
        if method == "auto":
            method = "roi_align" if x.device.type == "cuda" else "resize"
        src = x.float() if method == "roi_align" else (
            x.contiguous(memory_format=torch.channels_last) if x.shape[1] == 3 else x)
        batch = x.shape[0]
        out: dict[str, list[Tensor]] = {}
        for key, n_views, size, scale, blur_p, sol_p in (
            ("global_views", cfg.n_global, cfg.global_size, cfg.global_scale, self._global_blur,
             self._global_solarize),
            ("local_views", cfg.n_local, cfg.local_size, cfg.local_scale,
             torch.full((max(cfg.n_local, 1),), cfg.blur_p[2]), torch.zeros(max(cfg.n_local, 1))),
        ):
            if n_views == 0:
                out[key] = []
                continue
            params = sample_params(cfg, sizes.repeat(n_views, 1), scale,
                                   blur_p.repeat_interleave(batch), sol_p.repeat_interleave(batch),
                                   generator)
            views = self.crops(src, params, size)
            out[key] = list(views.split(batch))
        return out

    def _cut(self, src: Tensor, boxes: Tensor, rows: Tensor, size: int) -> Tensor:
        """Crops ``boxes`` [N, 4] (top, left, height, width) of images ``rows`` [N] of ``src``,
        resized to ``size`` -> float [N, C, size, size] in [0, 1]."""
        n = boxes.shape[0]
        if src.is_floating_point():  # roi_align over every box at once
            top, left, h, w = boxes.double().unbind(1)
            rois = torch.stack([rows.double(), left, top, left + w, top + h], 1).to(src.device, src.dtype)
            x = roi_align(src, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
            return x.mul_(1.0 / 255.0).clamp_(0.0, 1.0)
        mode = F.InterpolationMode(self.config.interpolation)
        x = torch.empty(n, src.shape[1], size, size, dtype=torch.uint8, device=src.device)
        for r, (img, (i, j, h, w)) in enumerate(zip(rows.tolist(), boxes.tolist())):
            x[r] = F.resized_crop(src[img], i, j, h, w, [size, size], interpolation=mode, antialias=True)
        return x.float().mul_(1.0 / 255.0)

    def crops(self, src: Tensor, p: CropParams, size: int) -> Tensor:
        """``N`` crops of ``size`` px from ``src`` [B, C, H, W] (uint8 for ``resize``, float 0..255
        for ``roi_align``; row ``r`` of ``p`` crops image ``r % B``) -> normalised float
        [N, C', size, size]."""
        cfg, dev = self.config, src.device
        n, batch = p.boxes.shape[0], src.shape[0]
        # Group the crops: blurred ones last, then by colour-operation order (a contiguous slice each).
        group = torch.where(p.jitter, _perm_index(p.order), torch.full((n,), 24))
        key = p.blur.long() * 32 + group
        sort = torch.argsort(key, stable=True)
        key_sorted = key[sort]
        x = self._cut(src, p.boxes[sort], sort % batch, size)
        if x.shape[1] == 1 and cfg.channels == 3:
            x = x.expand(-1, 3, -1, -1).contiguous()
        flip = p.flip[sort]
        if flip.any():
            idx = flip.nonzero().squeeze(1).to(dev)
            x[idx] = x[idx].flip(-1)
        # colour jitter: each group of crops shares one order of the four operations
        bounds = torch.searchsorted(key_sorted, torch.arange(65)).tolist()
        factors = p.factors[sort].to(dev, x.dtype)
        for blur_flag in (0, 1):
            for g in range(24):
                lo, hi = bounds[blur_flag * 32 + g], bounds[blur_flag * 32 + g + 1]
                if lo == hi:
                    continue
                seg = x[lo:hi]
                for op in _PERMS[g]:
                    seg = _OPS[op](seg, factors[lo:hi, op])
                x[lo:hi] = seg
        grey = p.grey[sort]
        if grey.any():
            idx = grey.nonzero().squeeze(1).to(dev)
            x[idx] = _grey(x[idx]).expand(-1, 3, -1, -1)
        start = bounds[32]
        if start < n:
            kernel = min(cfg.blur_kernel, 2 * size - 1)
            x[start:] = gaussian_blur(x[start:], p.sigma[sort][start:], kernel)
        sol = p.solarize[sort]
        if sol.any():
            idx = sol.nonzero().squeeze(1).to(dev)
            v = x[idx]
            x[idx] = torch.where(v >= SOLARIZE_THRESHOLD, 1.0 - v, v)
        mean = torch.tensor(self.preprocessing.mean, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocessing.std, device=dev).view(1, -1, 1, 1)
        return torch.empty_like(x).index_copy_(0, sort.to(dev), x.sub_(mean).div_(std))

    def __repr__(self) -> str:
        c = self.config
        return (f"BatchedMultiCrop({c.n_global} x {c.global_size}px + {c.n_local} x {c.local_size}px, "
                f"channels={c.channels}, device={self.device or 'of the images'})")


_PERMS = list(permutations(range(4)))
_PERM_CODE = {perm: i for i, perm in enumerate(_PERMS)}


def _perm_index(order: Tensor) -> Tensor:
    """[N, 4] permutations -> their index in ``_PERMS`` (lexicographic order), [N]."""
    weights = torch.tensor([6, 2, 1, 0])  # factorial number system
    rank = torch.zeros(order.shape[0], dtype=torch.long)
    for i in range(4):
        smaller_later = (order[:, i + 1 :] < order[:, i : i + 1]).sum(1)
        rank += smaller_later * weights[i]
    return rank


# --------------------------------------------------------------------------- worker-side decode
class DecodeUInt8:
    """Worker-side half of ``data.augment_on=device``: image (PIL or tensor) -> uint8 [C, H, W]
    with C = ``channels`` (alpha on white, palettes expanded, RGB -> luma for 1 channel), its short
    side shrunk to ``max_short_side`` when larger (PIL, antialiased; None keeps the size)."""

    def __init__(self, channels: int = 3, max_short_side: int | None = None):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if max_short_side is not None and (not isinstance(max_short_side, int) or max_short_side < 1):
            raise ValueError(f"max_short_side must be an int >= 1 or None, got {max_short_side!r}")
        self.channels, self.max_short_side = channels, max_short_side

    def __call__(self, img: Any) -> Tensor:
        if isinstance(img, Image.Image):
            img = to_l_or_rgb(img)
            img = img.convert("L" if self.channels == 1 else "RGB")
            if self.max_short_side and min(img.size) > self.max_short_side:
                w, h = img.size
                s = self.max_short_side / min(w, h)
                size = (max(1, round(w * s)), max(1, round(h * s)))
                img.draft(img.mode, size)  # JPEG: decode at a reduced DCT scale when it can
                img = img.resize(size, Image.BICUBIC, reducing_gap=3.0)
            return F.pil_to_tensor(img)
        if not isinstance(img, Tensor):
            raise TypeError(f"img must be a PIL image or a tensor, got {type(img).__name__}")
        t = to_image_tensor(img, self.channels).mul_(255.0).round_().to(torch.uint8)
        if self.max_short_side and min(t.shape[-2:]) > self.max_short_side:
            t = F.resize(t, self.max_short_side, interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        return t


def collate_uint8(batch: Sequence[Any]) -> dict[str, Tensor]:
    """Items ``uint8 [C, H, W]`` or ``(uint8 [C, H, W], label)`` -> ``{"images": uint8 [B, C, H_max,
    W_max] (edge-padded), "sizes": [B, 2], "labels": [B] (-1 = unlabelled)}``; feed ``images`` and
    ``sizes`` to :class:`BatchedMultiCrop`."""
    images, labels = [], []
    for item in batch:
        if isinstance(item, (tuple, list)):
            images.append(item[0])
            labels.append(-1 if len(item) < 2 or item[1] is None else int(item[1]))
        else:
            images.append(item)
            labels.append(-1)
    x, sizes = stack_uint8(images)
    return {"images": x, "sizes": sizes, "labels": torch.tensor(labels, dtype=torch.long)}


class UInt8Collate:
    """Collate for ``data.augment_on=device``: :func:`collate_uint8`'s batch plus, with a
    ``mask_collate`` (a :class:`~dinokit.data.MultiCropCollate` holding a mask generator), the
    iBOT masks of the ``n_global`` global crops of ``global_size`` px, exactly as that collate
    makes them (``masks``, ``mask_indices``, ``mask_weights``, ``n_masked``); else ``masks=None``."""

    def __init__(self, mask_collate: Any = None, n_global: int = 2, global_size: int = 224):
        self.mask_collate, self.n_global, self.global_size = mask_collate, n_global, global_size

    @property
    def mask_sampling(self) -> str:
        """The mask collate's ``mask_sampling`` (``"batch"`` without one)."""
        return getattr(self.mask_collate, "mask_sampling", "batch")

    def __call__(self, batch: Sequence[Any], sample_seeds: Sequence[int] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = dict(collate_uint8(batch))
        mc = self.mask_collate
        if mc is None or mc.mask_generator is None:
            out["masks"] = None
            return out
        side = self.global_size // mc.patch_size
        out.update(mc.batch_masks(len(batch), self.n_global, (side, side), sample_seeds))
        return out
