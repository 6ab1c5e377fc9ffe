"""DINOv3's high-resolution adaptation stage: a run at two resolutions resumes exactly across the
boundary, the Gram teacher is fed the stage's higher resolution, learned position embeddings are
interpolated to the larger grid, and the DINOv3 presets carry the stage."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from dinokit.backbones import build_backbone
from dinokit.cli import main
from dinokit.clock import place_stages
from dinokit.config import ConfigError, load_config
from dinokit.methods.terms.gram import GramTerm
from dinokit.settings import StageSettings

TINY_V3 = [
    "--config", "dinov3_tiny_cpu", "data.dataset=digits", "data.limit=192", "data.batch_size=32",
    "data.num_workers=0", "trainer.epochs=2", "trainer.progress=false", "trainer.log_every_n_steps=1",
    "backbone.kwargs={img_size: 28, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2, in_chans: 1}",
    "dino.n_prototypes=64", "ibot.n_prototypes=64", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
    "crops.n_local=2",
    # schedules that do not depend on the run length, so a cut run resumed with a larger max_steps compares
    "optim.warmup_epochs=0", "optim.min_lr=0.0005", "optim.lr=0.0005", "optim.weight_decay_end=0.04",
    "teacher.momentum=0.996", "teacher.final_momentum=0.996",
    "gram.weight=1.0", "gram.start_step=2", "gram.refresh_every=3",
    "stages=[{name: base, steps: 4}, {name: high_res, crops: {global_size: 56, local_size: 16}, "
    "gram_teacher_size: 84}]",
]


def _train(tmp_path, name, *extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["train", *TINY_V3, f"trainer.output_dir={tmp_path}", f"trainer.run_name={name}", *extra])


def _ckpt(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def test_a_two_resolution_run_resumes_exactly_and_its_gram_teacher_sees_the_higher_resolution(
        tmp_path, monkeypatch):
    seen: list[tuple[int, int]] = []  # (student global crop size, Gram teacher input size) per step
    original = GramTerm._teacher_patches

    def recording(self, f, teacher_backbone):
        sizes: list[int] = []
        hook = self.gram_teacher.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[-1]))
        try:
            return original(self, f, teacher_backbone)
        finally:
            hook.remove()
            seen.append((f.global_images.shape[-1], sizes[0]))

    monkeypatch.setattr(GramTerm, "_teacher_patches", recording)
    assert _train(tmp_path, "ref", "trainer.max_steps=7") == 0
    # Gram from step 2: steps 2-3 at the base crops (the Gram teacher gets them as they are), steps
    # 4-6 in the high-resolution stage: 56 px crops, the Gram teacher fed 84 px
    assert seen == [(28, 28), (28, 28), (56, 84), (56, 84), (56, 84)]
    monkeypatch.setattr(GramTerm, "_teacher_patches", original)

    assert _train(tmp_path, "cut", "trainer.max_steps=3") == 0  # inside the base stage
    assert _train(tmp_path, "cut", "trainer.max_steps=7", "trainer.resume=last") == 0
    a = _ckpt(tmp_path / "ref" / "checkpoints" / "last.ckpt")
    b = _ckpt(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 7
    assert any(".gram_teacher." in k for k in a["state_dict"])
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=0, atol=0, msg=f"{k} differs")


def test_learned_position_embeddings_are_interpolated_to_the_larger_grid():
    """The tiny preset's ViT has learned absolute position embeddings on a 7x7 grid (28 px, patch
    4); at 56 px its 14x14 patches get them resized bicubically (reference written here), the CLS
    token keeps its own, and
    training at 56 px moves the 7x7 table."""
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny_patch16_224", encoder_kwargs=dict(img_size=28, patch_size=4, depth=1,
                                                                     embed_dim=32, num_heads=2, in_chans=1))
    table = vit.model.pos_embed
    assert table.requires_grad and table.shape == (1, 1 + 7 * 7, 32)  # CLS + 7x7 grid
    x = torch.randn(2, 1, 56, 56)
    grid = table[:, 1:].reshape(1, 7, 7, 32).permute(0, 3, 1, 2)
    # timm's resample_abs_pos_embed: bicubic with antialias (PyTorch's a = -0.5 cubic kernel)
    ref = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False, antialias=True)
    ref = ref.permute(0, 2, 3, 1).reshape(1, 14 * 14, 32)
    with torch.no_grad():
        tokens = vit.tokens(x)
        patches = vit.model.patch_embed(x).reshape(2, 14 * 14, 32)
    torch.testing.assert_close(tokens[:, 1:] - patches, ref.expand(2, -1, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:, 0], (vit.model.cls_token + table[:, :1])[:, 0].expand(2, -1))
    vit(x).patches.sum().backward()
    assert table.grad is not None and table.grad[:, 1:].abs().sum() > 0


@pytest.mark.parametrize("preset, sizes", [
    ("dinov3_tiny_cpu", (56, 16, 84, 0.98)),
    ("dinov3_vit_small", (512, 112, 768, 0.999)),  # the official high-resolution adaptation's
    ("continue_dinov3", (512, 112, 768, 0.999)),
])
def test_the_dinov3_presets_end_with_the_high_resolution_stage(preset, sizes):
    cfg = load_config(preset)
    last = cfg.stages[-1]
    assert last.name == "high_res"
    assert (last.crops["global_size"], last.crops["local_size"], last.gram_teacher_size,
            last.teacher_momentum) == sizes
    assert last.crops["global_size"] > (cfg.crops.global_size or 28)
    placed = place_stages(cfg.stages, 100_000, 1000)  # a run longer than continue_dinov3's warm-up
    assert placed[-1].end == 100_000 and 0.05 <= 1 - placed[-1].start / 100_000 <= 0.2  # the run's last part


def test_a_stage_length_as_a_fraction_keeps_its_share_of_any_run():
    stages = [StageSettings(name="a", fraction=0.8), StageSettings(name="b")]
    for total in (10, 31, 1000):
        a, b = place_stages(stages, total, 7)
        assert (a.start, a.end, b.end) == (0, round(0.8 * total), total)
    with pytest.raises(ConfigError, match="give steps, epochs or fraction, not steps and fraction"):
        load_config("demo", ["stages=[{name: a, steps: 3, fraction: 0.5}, {name: b}]"])
    with pytest.raises(ConfigError, match="fraction"):
        load_config("demo", ["stages=[{name: a, fraction: 1.5}, {name: b}]"])
