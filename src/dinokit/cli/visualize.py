"""``dinokit viz attention|pca|tsne|curves``: pictures of a trained backbone or run."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dinokit.cli._common import add_checkpoint_arg, dataset, load, loader, which_of
from dinokit.config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("viz", help="attention maps, PCA maps, t-SNE, training curves (PNG)")
    kinds = p.add_subparsers(dest="viz_kind", metavar="{attention,pca,tsne,curves}", required=True)
    for name, text in (("attention", "last-block CLS attention per head (ViTs)"),
                       ("pca", "PCA of patch features as RGB")):
        q = kinds.add_parser(name, help=text, description=text)
        add_checkpoint_arg(q)
        q.add_argument("--images", required=True, help="image file, folder, or demo|fashion-mnist|digits")
        q.add_argument("--n", type=int, default=4, help="number of images")
        q.add_argument("--output", required=True, help="output folder")
        if name == "attention":
            q.add_argument("--threshold", type=float, default=0.6, help="attention mass to keep")
        q.set_defaults(func=run)
    q = kinds.add_parser("tsne", help="2-D t-SNE of features coloured by label")
    add_checkpoint_arg(q)
    q.add_argument("--data", required=True, help="folder or demo|fashion-mnist|digits")
    q.add_argument("--limit", type=int, default=2000)
    q.add_argument("--method", choices=("tsne", "pca"), default="tsne")
    q.add_argument("--output", required=True, help="PNG file")
    q.set_defaults(func=run)
    q = kinds.add_parser("curves", help="training curves of a run directory")
    q.add_argument("--run", required=True, help="run directory")
    q.add_argument("--output", required=True, help="PNG file")
    q.set_defaults(func=run)


def _images(spec: str, transform, n: int) -> torch.Tensor:
    path = Path(spec)
    if path.is_file() and getattr(transform, "channels", 3) not in (1, 3):  # one multi-band file
        from dinokit.data.multiband import load_image

        return transform(load_image(path)).unsqueeze(0)
    if path.is_file():
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            return transform(im.copy()).unsqueeze(0)
    ds = dataset(spec, transform, split="test", limit=n)
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


def run(args: argparse.Namespace) -> int:
    if args.viz_kind == "curves":
        from dinokit.viz.curves import plot_training_curves

        print(plot_training_curves(args.run, args.output))
        return 0
    model = load(args.checkpoint, which_of(args))
    tf = model.transform
    if args.viz_kind == "tsne":
        from dinokit.eval import extract_features
        from dinokit.viz.embedding import plot_embedding_2d

        ds = dataset(args.data, tf, split="test", limit=args.limit)
        f, y = extract_features(model.backbone, loader(ds))
        names = getattr(getattr(ds, "dataset", ds), "classes", None) or None
        print(plot_embedding_2d(f, y, args.output, method=args.method, class_names=names))
        return 0
    images = _images(args.images, tf, args.n)
    out = Path(args.output)
    mean, std = tuple(tf.mean), tuple(tf.std)
    if args.viz_kind == "attention":
        from dinokit.viz.attention import cls_attention_maps, plot_attention

        try:
            maps = cls_attention_maps(model.backbone, images)
        except TypeError as e:
            raise ConfigError(str(e)) from None
        for i in range(len(images)):
            print(plot_attention(images[i], maps[i], out / f"attention_{i}.png", threshold=args.threshold,
                                 mean=mean, std=std))
        return 0
    from dinokit.viz.pca import pca_patch_maps, plot_pca

    with torch.no_grad():
        feats = model.backbone(images)
    if feats.patches is None or not model.backbone.patch_size:
        raise ConfigError("PCA maps need patch tokens on a patch grid (a ViT backbone)")
    grid = model.backbone.grid_size(images.shape[-2], images.shape[-1])
    print(plot_pca(images, pca_patch_maps(feats.patches, grid), out / "pca.png", mean=mean, std=std))
    return 0
