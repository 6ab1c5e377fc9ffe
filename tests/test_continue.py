"""Continue pretraining from published DINOv2 / DINOv3 weights: files in timm's and Meta's layouts
(written here from random-weight timm models; nothing is downloaded) go into student, teacher and
the Gram teacher; bad files say what they hold; the ``continue_dinov3`` preset runs end to end and
its export loads with ``timm.create_model("local-dir:...")``."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from dinokit.cli import main
from dinokit.config import apply_overrides, from_dict, load_config
from dinokit.train.build import build_method
from dinokit.weights import WeightsError, apply_init_weights, layout_of, read_file

TINY_V3 = dict(depth=2, embed_dim=32, num_heads=2)
V2_KW = dict(img_size=56, depth=2, embed_dim=32, num_heads=2)


def meta_dinov3(sd: dict, mask_token: torch.Tensor) -> dict:
    """timm Eva keys -> the official DINOv3 keys (vision_transformer.py: storage_tokens, ls1.gamma,
    fused qkv.bias with a fixed-zero k part, a [1, D] mask_token, rope periods)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.q_bias") or k.endswith("attn.v_bias"):
            continue
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[k] = v.clone()
        if k.endswith("attn.qkv.weight"):
            pre = k[: -len("qkv.weight")]
            q = sd.get(pre + "q_bias")
            d = v.shape[1]
            if q is not None:
                out[pre + "qkv.bias"] = torch.cat([q, torch.zeros(d), sd[pre + "v_bias"]])
            else:
                out[pre + "qkv.bias"] = torch.zeros(3 * d)
            out[pre + "qkv.bias_mask"] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
    out["mask_token"] = mask_token.reshape(1, -1)
    out["rope_embed.periods"] = torch.arange(1.0, 5.0)
    return out


def meta_dinov2(sd: dict, mask_token: torch.Tensor) -> dict:
    """timm reg4 DINOv2 keys -> the official hub keys: register_tokens, a pos_embed with a CLS slot
    (timm folds that slot into cls_token), a [1, D] mask_token."""
    out = {k: v.clone() for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    p0 = torch.randn(1, 1, sd["pos_embed"].shape[-1])
    out["register_tokens"] = sd["reg_token"].clone()
    out["cls_token"] = sd["cls_token"] - p0
    out["pos_embed"] = torch.cat([p0, sd["pos_embed"]], dim=1)
    out["mask_token"] = mask_token.reshape(1, -1)
    return out


def _config(overrides: list[str]):
    return apply_overrides(from_dict({"data": {"dataset": "digits"}}), overrides)


def _v3_model(name="vit_small_patch16_dinov3", seed=1):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=0, **TINY_V3).eval()


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb"])
def test_meta_dinov3_file_gives_the_same_features_as_the_timm_model(name, tmp_path):
    src = _v3_model(name)
    mask = torch.randn(1, 32)
    f = tmp_path / "dinov3.pth"
    torch.save(meta_dinov3(src.state_dict(), mask), f)
    assert layout_of(read_file(f)) == "meta_dinov3"
    cfg = _config(["model.method=dinov3", f"backbone.name={name}", "backbone.n_registers=4",
                             f"backbone.kwargs={TINY_V3}", "dino.n_prototypes=16",
                             "ibot.n_prototypes=16", "heads.hidden_dim=16",
                             "heads.bottleneck_dim=8", "gram.weight=1.0", "data.dataset=digits",
                             "crops.global_size=32", "crops.local_size=16", f"model.init_weights={f}"])
    torch.manual_seed(0)
    method = build_method(cfg)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref = src.forward_features(x)
        for bb in (method.student_backbone, method.teacher_backbone, method.gram_teacher):
            out = bb.eval()(x)
            torch.testing.assert_close(out.cls, ref[:, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.patches, ref[:, 5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(method.student_backbone.mask_token, mask.reshape(1, 1, -1))


def test_meta_dinov2_and_timm_files_load_alike(tmp_path):
    torch.manual_seed(1)
    src = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, dynamic_img_size=True, **V2_KW).eval()
    with torch.no_grad():
        src.cls_token.normal_()  # timm starts it at ~1e-6: float rounding of the CLS slot would dominate
    meta = meta_dinov2(src.state_dict(), torch.randn(1, 32))
    torch.save(meta, tmp_path / "meta.pth")
    # an official training checkpoint: chunked block names (blocks.<chunk>.<global index>.), teacher entry
    chunked = {f"teacher.backbone.{k.replace('blocks.1.', 'blocks.1.1.').replace('blocks.0.', 'blocks.0.0.')}": v
               for k, v in meta.items()}
    torch.save({"model": chunked, "iteration": 10}, tmp_path / "training.pth")
    save_file(src.state_dict(), str(tmp_path / "timm.safetensors"))
    x = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        ref = src.forward_features(x)
    for f in ("meta.pth", "training.pth", "timm.safetensors"):
        cfg = _config(["model.method=dinov2", "backbone.name=vit_small_patch14_reg4_dinov2",
                                 "backbone.n_registers=4", f"backbone.kwargs={V2_KW}", "dino.n_prototypes=16",
                                 "ibot.n_prototypes=16", "heads.hidden_dim=16",
                                 "heads.bottleneck_dim=8", "data.dataset=digits", "crops.global_size=28",
                                 "crops.local_size=14", f"model.init_weights={tmp_path / f}"])
        torch.manual_seed(0)
        method = build_method(cfg)
        with torch.no_grad():
            out = method.teacher_backbone.eval()(x)
        torch.testing.assert_close(out.cls, ref[:, 0], rtol=1e-5, atol=1e-5, msg=f)
        torch.testing.assert_close(out.registers, ref[:, 1:5], rtol=1e-5, atol=1e-5, msg=f)


class _Cfg:
    """A minimal stand-in for ``cfg`` with the sections apply_init_weights reads."""

    def __init__(self, init_weights=None, teacher_path=None, **backbone):
        from dinokit.settings import BackboneSettings, GramSettings, ModelSettings

        self.model = ModelSettings(init_weights=init_weights)
        self.backbone, self.gram = BackboneSettings(**backbone), GramSettings(teacher_path=teacher_path)


def _method():
    import dinokit

    torch.manual_seed(0)
    from conftest import settings

    return dinokit.DINOv3("vit_small_patch16_dinov3", n_cls_prototypes=16, n_patch_prototypes=16,
                          projector_hidden_dim=16, projector_bottleneck_dim=8,
                          settings=settings(gram={"weight": 1.0}, backbone={"kwargs": TINY_V3}))


def test_wrong_size_names_keys_and_shapes_and_loads_nothing(tmp_path):
    torch.manual_seed(1)
    big = timm.create_model("vit_small_patch16_dinov3", num_classes=0, depth=2, embed_dim=64, num_heads=2)
    save_file(big.state_dict(), str(tmp_path / "big.safetensors"))
    method = _method()
    before = {k: v.clone() for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(WeightsError, match=r"shape mismatches \['blocks.0.attn.proj.bias: file \(64,\) vs model \(32,\)"):
        apply_init_weights(method, _Cfg(init_weights=str(tmp_path / "big.safetensors")))
    sd = {k: v for k, v in _v3_model().state_dict().items() if not k.startswith("blocks.1.")}
    save_file(sd, str(tmp_path / "short.safetensors"))
    with pytest.raises(WeightsError, match=r"missing keys \['blocks.1.gamma_1'"):
        apply_init_weights(method, _Cfg(init_weights=str(tmp_path / "short.safetensors")))
    after = method.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_truncated_safetensors_and_foreign_files_are_clean_errors(tmp_path):
    good = tmp_path / "w.safetensors"
    save_file(_v3_model().state_dict(), str(good))
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        apply_init_weights(_method(), _Cfg(init_weights=str(bad)))
    # a backbone-only file where a training checkpoint is expected says what it holds
    with pytest.raises(WeightsError, match=r"holds backbone-only weights in timm layout.*expected a dinokit "
                                           r"training checkpoint"):
        main_export(good, tmp_path / "out")


def main_export(src, out):
    from dinokit.export import export_backbone

    return export_backbone(src, out)


def test_official_teacher_checkpoint_gives_its_backbone(tmp_path):
    src = _v3_model()
    meta = meta_dinov3(src.state_dict(), torch.randn(1, 32))
    full = {"teacher": {**{f"backbone.{k}": v for k, v in meta.items()},
                        "dino_head.mlp.0.weight": torch.zeros(4, 32)}}
    torch.save(full, tmp_path / "teacher_checkpoint.pth")
    method = _method()
    apply_init_weights(method, _Cfg(init_weights=str(tmp_path / "teacher_checkpoint.pth"),
                                    freeze_patch_embed=True, grad_checkpointing=True))
    assert method.student_backbone.model.grad_checkpointing and not method.teacher_backbone.grad_checkpointing
    torch.testing.assert_close(method.student_backbone.model.cls_token, src.cls_token)
    torch.testing.assert_close(method.gram_teacher.model.reg_token, src.reg_token)
    assert not any(p.requires_grad for p in method.student_backbone.model.patch_embed.parameters())
    assert method.student_backbone.model.blocks[0].norm1.weight.requires_grad


def test_crop_sizes_the_patch_does_not_divide_are_named(tmp_path):
    cfg = _config(["backbone.name=vit_small_patch16_dinov3", f"backbone.kwargs={TINY_V3}",
                             "dino.n_prototypes=16", "heads.hidden_dim=16", "heads.bottleneck_dim=8",
                             "data.dataset=digits", "crops.global_size=40", "crops.local_size=16"])
    with pytest.raises(ValueError, match="crops.global_size=40 is not a multiple of the patch size 16.*32 or 48"):
        build_method(cfg)


def test_continue_dinov3_preset_trains_exports_and_loads_in_timm(tmp_path):
    src = _v3_model()
    weights = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save(meta_dinov3(src.state_dict(), torch.randn(1, 32)), weights)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "runs"
    assert main(["train", "--config", "continue_dinov3", "backbone.name=vit_small_patch16_dinov3",
                 f"model.init_weights={weights}", f"data.path={images}",
                 f"backbone.kwargs={TINY_V3}", "dino.n_prototypes=16", "ibot.n_prototypes=16",
                 "heads.hidden_dim=16", "heads.bottleneck_dim=8", "crops.global_size=32",
                 "crops.local_size=16", "crops.n_local=2", "data.batch_size=4", "data.num_workers=0",
                 "trainer.max_steps=2", "trainer.epochs=1", "trainer.precision=32", "trainer.accelerator=cpu",
                 "trainer.devices=1", "trainer.progress=false", f"trainer.output_dir={out}",
                 "trainer.run_name=cont"]) == 0
    run = out / "cont"
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "exp")]) == 0
    import dinokit

    trained = dinokit.load_backbone(tmp_path / "exp.safetensors")
    # started from the file: the slow (0.999) teacher is still next to it after two steps
    torch.testing.assert_close(trained.model.reg_token, src.reg_token, atol=1e-3, rtol=0)
    model = timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True).eval()
    assert model.pretrained_cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)[:, 0], trained(x).cls, rtol=0, atol=0)


def test_a_training_checkpoint_where_an_export_is_expected_says_so(tmp_path):
    import dinokit

    method = _method()
    torch.save({"state_dict": {f"method.{k}": v for k, v in method.state_dict().items()
                               if isinstance(v, torch.Tensor)}}, tmp_path / "last.ckpt")
    with pytest.raises(WeightsError, match="holds a dinokit training checkpoint.*expected a dinokit export"):
        dinokit.load_backbone(tmp_path / "last.ckpt")
    # as init_weights it is welcome: heads come with it
    other = _method()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    apply_init_weights(other, _Cfg(init_weights=str(tmp_path / "last.ckpt")))
    for (k, a), b in zip(method.state_dict().items(), other.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k


@pytest.mark.parametrize(("name", "patch"), [("continue_dinov2", 14), ("continue_dinov3", 16)])
def test_continue_presets_are_gentler_than_pretraining(name, patch):
    cfg = load_config(name)
    scratch = load_config(name.replace("continue_", "") + "_vit_small")
    assert cfg.crops.global_size % patch == 0 and cfg.crops.local_size % patch == 0
    assert cfg.optim.lr < scratch.optim.lr and cfg.optim.warmup_epochs < scratch.optim.warmup_epochs
    assert cfg.teacher.momentum > scratch.teacher.momentum
    assert cfg.optim.layer_decay < 1 and cfg.optim.patch_embed_lr_mult < 1


def _images(folder, n=8, size=40, channels=3):
    folder.mkdir()
    rng = np.random.default_rng(0)
    shape = (size, size, channels) if channels == 3 else (size, size)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


TINY_RUN = ["dino.n_prototypes=16", "heads.hidden_dim=16", "heads.bottleneck_dim=8", "crops.n_local=2",
            "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=3", "trainer.epochs=5",
            "trainer.precision=32", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.progress=false",
            "trainer.log_every_n_steps=1",
            "stages=[{name: heads, steps: 2, frozen: [backbone], until_teacher_entropy: 0.001}, {name: all}]"]


def _continue_files(tmp_path):
    """A starting file per continue preset, in the layout published weights come in: timm's state
    dict for a CNN, Meta's hub keys for the DINOv2 and DINOv3 ViTs (random weights)."""
    torch.manual_seed(1)
    cnn = timm.create_model("resnet10t", num_classes=0).eval()
    save_file(cnn.state_dict(), str(tmp_path / "resnet10t.safetensors"))
    torch.manual_seed(1)
    v2 = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, dynamic_img_size=True, **V2_KW)
    torch.save(meta_dinov2(v2.state_dict(), torch.randn(1, 32)), tmp_path / "dinov2.pth")
    torch.save(meta_dinov3(_v3_model().state_dict(), torch.randn(1, 32)), tmp_path / "dinov3.pth")
    return {
        "continue_dino": (cnn, tmp_path / "resnet10t.safetensors",
                          ["backbone.name=resnet10t", "crops.global_size=32", "crops.local_size=16"]),
        "continue_dinov2": (v2, tmp_path / "dinov2.pth",
                            ["backbone.name=vit_small_patch14_reg4_dinov2", f"backbone.kwargs={V2_KW}",
                             "ibot.n_prototypes=16", "crops.global_size=28", "crops.local_size=14"]),
        "continue_dinov3": (None, tmp_path / "dinov3.pth",
                            ["backbone.name=vit_small_patch16_dinov3", f"backbone.kwargs={TINY_V3}",
                             "ibot.n_prototypes=16", "crops.global_size=32", "crops.local_size=16"]),
    }


@pytest.mark.parametrize("preset", ["continue_dino", "continue_dinov2", "continue_dinov3"])
def test_each_continue_preset_warms_the_heads_up_on_the_published_backbone_then_trains_it(preset, tmp_path):
    """The preset loads its published-layout file into student and teacher, runs its head warm-up
    (backbone bit-identical to the file's, heads moving) and then trains the backbone."""
    model, weights, arch = _continue_files(tmp_path)[preset]
    images = _images(tmp_path / "images")
    out = tmp_path / "runs"
    common = ["train", "--config", preset, f"model.init_weights={weights}", f"data.path={images}", *arch,
              *TINY_RUN, f"trainer.output_dir={out}", "trainer.run_name=cont"]
    assert main([*common, "trainer.max_steps=2"]) == 0
    warm = torch.load(out / "cont" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    torch.manual_seed(0)
    start = build_method(load_config(preset, [f"model.init_weights={weights}", f"data.path={images}", *arch,
                                              *TINY_RUN]))
    start_sd = {f"method.{k}": v for k, v in start.state_dict().items()}
    backbone = [k for k in warm if k.startswith(("method.student.backbone.", "method.teacher.backbone."))]
    for k in backbone:
        assert torch.equal(warm[k], start_sd[k]), k
    if model is not None:  # the file's weights, not a fresh init
        file_sd = model.state_dict()
        k = next(k for k in file_sd if k.endswith("weight") and file_sd[k].ndim > 1)
        torch.testing.assert_close(warm[f"method.teacher.backbone.model.{k}"], file_sd[k])
    assert any(not torch.equal(warm[k], start_sd[k]) for k in warm if k.startswith("method.student.head."))
    assert main([*common, "trainer.max_steps=3", "trainer.resume=last"]) == 0
    after = torch.load(out / "cont" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(not torch.equal(after[k], start_sd[k]) for k in backbone if k.startswith("method.student."))


@pytest.mark.parametrize("preset", ["continue_dino", "continue_dinov2", "continue_dinov3"])
def test_continue_presets_start_with_a_head_warm_up(preset):
    cfg = load_config(preset)
    head = cfg.stages[0]
    assert head.frozen == ["backbone"] and head.until_teacher_entropy and head.skip_with_init_heads
    main = cfg.stages[1]  # the backbone's own stage follows, its learning rate warmed up again
    assert main.warmup_epochs > 0 and not main.frozen
