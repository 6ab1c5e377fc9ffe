"""Settings objects, one per concern: the config's sections and what each part takes.

A run's config (:mod:`dinokit.config`) is a tree of these dataclasses, grouped as the papers and
dinov3's ``ssl_default_config.yaml`` group them: the backbone, the heads, the teacher
(temperatures, warm-up, EMA momentum, centring), one section per loss term (``dino``, ``ibot``,
``koleo``, ``gram``), the crops, the data, the optimiser, the trainer, and the stages. Each part
takes the section it needs (a loss term its own section, a head :class:`HeadSettings`), so a knob
has one name in YAML, in Python and in the docs.

A field whose default is ``None`` means "the method's official choice" (e.g. ``teacher.momentum``:
DINO 0.996, DINOv2/v3 0.992); the method presets resolve it.

Every field carries its ``help`` text and range in its metadata: the CLI's ``--help``, the docs
and the validation in :mod:`dinokit.config` all read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

#: Lightning accelerator names accepted by ``trainer.accelerator``.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
#: Lightning precision names accepted by ``trainer.precision``.
PRECISIONS = ("auto", "64", "64-true", "32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed",
              "bf16-true")
#: Families of Lightning strategy names accepted by ``trainer.strategy`` (``ddp``,
#: ``ddp_find_unused_parameters_true``, ``fsdp_cpu_offload``, ``deepspeed_stage_2``, ...).
STRATEGY_FAMILIES = ("auto", "ddp", "fsdp", "deepspeed", "single_device", "xla", "single_xla", "dp")


def setting(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with its help text and range checks (``min``/``max``/``gt``/``ge``/``le``,
    ``choices``, ``scale``/``ratio``/``betas`` for pairs)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


@dataclass
class ModelSettings:
    """Which method trains, and the weights it starts from."""

    method: str = setting("dino", "DINO-family method: dino, ibot, dinov2, dinov3, distill (the method "
                          "registry)",
                          method=True)
    init_weights: str | None = setting(
        None, "weights to start from (.safetensors/.pth: timm, Meta DINOv2/DINOv3, dinokit export or run "
        "checkpoint); loaded into student, teacher and Gram teacher")
    teacher: str | None = setting(
        None, "method=distill: the frozen teacher: a dinokit run or checkpoint (its heads: the DINOv3 "
        "objective), a dinokit export, or backbone weights in timm or Meta layout (feature distillation; "
        "distillation.teacher_backbone names the architecture)")
    students: list = setting(
        [], "method=distill: several students sharing one teacher forward, each a mapping {name, "
        "backbone: {backbone section overrides}, lr_mult}; empty = one student, 'student', from the "
        "backbone section")


@dataclass
class BackboneSettings:
    """The network whose features are learned."""

    name: str = setting("vit_small_patch16_224",
                        "timm model name, or torchvision/<name>; ViTs get dynamic_img_size=True")
    kwargs: dict = setting({}, "extra timm.create_model arguments (img_size, patch_size, in_chans, ...)")
    pretrained: bool = setting(False, "start from the published weights of the named backbone")
    n_registers: int | None = setting(
        None, "register tokens of the ViT (None = official: DINO/iBOT/DINOv2 0, DINOv3 4)", min=0, max=64)
    init: Literal["timm", "xavier"] = setting(
        "timm", "weight initialisation of a new timm ViT: timm = as timm builds it (the official DINOv2 "
        "init: trunc-normal(0.02) linear layers); xavier = MAE's and lightly's (xavier-uniform linear and "
        "patch-embedding weights, class token N(0, 0.02))")
    drop_path_rate: float = setting(0.0, "stochastic depth of the student ViT", ge=0, le=1)
    drop_path_mode: Literal["auto", "sample", "subset"] = setting(
        "auto", "stochastic depth form in plain ViT blocks: sample = timm DropPath (every sample through "
        "the branch, times a 0/1 mask); subset = DINOv2/v3's (the branch on the kept samples only, added "
        "back scaled by b/k: less compute); auto = official: DINOv3 subset, DINOv2 subset for rates > 0.1, "
        "DINO/iBOT sample")
    drop_path_uniform: bool | None = setting(
        None, "every student block gets drop_path_rate (else linspace(0, rate, depth)); None = official: "
        "DINOv2/v3 yes, DINO/iBOT no")
    freeze_patch_embed: bool = setting(False, "keep the patch embedding fixed (continued pretraining)")
    grad_checkpointing: bool = setting(False, "recompute student block activations in backward (less "
                                       "memory)")
    packed_crops: Literal["auto", "true", "false"] = setting(
        "auto", "all student crops through the ViT blocks in one sequence-packed pass, attention kept "
        "within each crop (auto: wherever the backbone can)")
    channels_last: bool = setting(True, "CNN weights and inputs in channels-last memory format (faster "
                                  "convolutions)")


@dataclass
class HeadSettings:
    """The projection heads (MLP, L2 norm, prototypes); shared by the DINO and iBOT heads."""

    hidden_dim: int = setting(2048, "hidden width of the head MLP", min=1, max=1 << 16)
    bottleneck_dim: int = setting(256, "bottleneck width before the prototypes", min=1, max=1 << 14)
    layers: int = setting(3, "layers of the head MLP", min=1, max=16)
    batch_norm: bool = setting(False, "BatchNorm in the head MLP (for CNN backbones)")
    norm_last_layer: bool | None = setting(
        None, "fix the prototype weight-norm gain at 1 (None = official: DINO/iBOT yes, DINOv2/v3 no)")
    weight_norm: bool | None = setting(
        None, "weight-normalised prototypes (None = official: DINO/iBOT/DINOv2 yes, DINOv3 no)")
    init: Literal["trunc_normal", "torch"] = setting(
        "trunc_normal", "how the head's linear layers start: trunc_normal = official (trunc-normal(0.02), "
        "zero biases); torch = nn.Linear's default kaiming-uniform (stable-pretraining's heads)")


@dataclass
class TeacherSettings:
    """The teacher: its temperature schedule, its EMA momentum and how its outputs are centred."""

    temperature: float = setting(0.07, "teacher temperature after the warm-up", gt=0)
    warmup_temperature: float = setting(0.04, "teacher temperature at the start of the warm-up", gt=0)
    warmup_epochs: float = setting(30, "epochs of teacher-temperature warm-up (0 = none)", ge=0)
    warmup_unit: Literal["epoch", "step"] | None = setting(
        None, "the warm-up moves once per epoch or once per step (None = official: DINO/iBOT epoch, "
        "DINOv2/v3 step)")
    momentum: float | None = setting(
        None, "EMA momentum at step 0, cosine to final_momentum (None = official: DINO/iBOT 0.996, "
        "DINOv2/v3 0.992)", ge=0, le=1)
    final_momentum: float = setting(1.0, "EMA momentum at the last step", ge=0, le=1)
    centering: Literal["ema", "sinkhorn"] | None = setting(
        None, "teacher centring: ema = DINO's centre, sinkhorn = Sinkhorn-Knopp (None = official: "
        "DINO/iBOT ema, DINOv2/v3 sinkhorn)")
    center_momentum: float = setting(0.9, "EMA momentum of the teacher centre (centering=ema)", ge=0, le=1)
    sinkhorn_iterations: int = setting(3, "Sinkhorn-Knopp iterations (centering=sinkhorn)", min=1, max=1000)


@dataclass
class DinoSettings:
    """The DINO loss on the CLS token (Caron et al. 2021)."""

    weight: float = setting(1.0, "weight of the DINO loss", ge=0)
    n_prototypes: int = setting(65536, "prototypes K of the CLS head", min=2, max=1 << 20)
    student_temperature: float = setting(0.1, "student temperature tau_s", gt=0)


@dataclass
class IBOTSettings:
    """The iBOT masked-patch loss (Zhou et al. 2022) and its masks (methods ibot, dinov2, dinov3)."""

    weight: float = setting(1.0, "weight of the iBOT patch loss", ge=0)
    n_prototypes: int = setting(65536, "prototypes of the patch head", min=2, max=1 << 20)
    shared_head: bool | None = setting(
        None, "one head for CLS and patch tokens (None = official: iBOT yes, DINOv2/v3 no)")
    student_temperature: float = setting(0.1, "student temperature of the patch loss", gt=0)
    mask_probability: float = setting(0.5, "fraction of global crops masked", ge=0, le=1)
    mask_ratio_range: tuple = setting((0.1, 0.5), "masked patch ratio range", ratio=True)
    mask_mode: Literal["block", "random"] = setting("block", "block (iBOT) or random masks")
    mask_sampling: Literal["batch", "sample"] = setting(
        "batch", "batch = official (masked crops and ratios spread over each batch); sample = each "
        "image's masks from (seed, epoch, index), the same at any batch size or world size")


@dataclass
class KoLeoSettings:
    """The KoLeo regulariser of the student's CLS features (Sablayrolles et al. 2019; DINOv2/v3)."""

    weight: float = setting(0.1, "weight of the KoLeo loss", ge=0)
    all_processes: bool = setting(
        False, "nearest neighbours over the global batch, gradient through the gather (DINOv3's "
        "koleo_loss_distributed); off = official default: per process")


@dataclass
class GramSettings:
    """Gram anchoring of the patch features (DINOv3, Siméoni et al. 2025)."""

    weight: float = setting(0.0, "weight of Gram anchoring (0 = off)", ge=0)
    start_step: int = setting(0, "step at which Gram anchoring starts (the Gram teacher is taken from "
                              "the EMA teacher here unless teacher_path gives it)", min=0)
    ramp_steps: int = setting(0, "steps over which its weight ramps up linearly (0 = official)", min=0)
    refresh_every: int | None = setting(None, "refresh the Gram teacher from the EMA teacher every N "
                                        "steps (None = never)", min=1)
    first_refresh_step: int = setting(0, "no Gram teacher refresh before this step", min=0)
    max_refreshes: int | None = setting(None, "at most this many refreshes", min=0)
    ema_teacher: bool = setting(False, "use the EMA teacher itself as Gram teacher")
    img_level: bool = setting(False, "Gram matrices per image (else over the local batch)")
    remove_neg: bool = setting(False, "clamp negative similarities before the loss")
    remove_only_teacher_neg: bool = setting(False, "clamp only the teacher's negatives")
    teacher_size: int | None = setting(None, "Gram teacher input size (global crops resized)", min=4)
    teacher_path: str | None = setting(None, "Gram teacher backbone weights file")


@dataclass
class DistillationSettings:
    """Distillation from a frozen teacher (method ``distill``): what the students learn."""

    objective: Literal["auto", "dinov3", "features"] = setting(
        "auto", "dinov3 = the student's heads learn the teacher's Sinkhorn-Knopp-centred DINO and iBOT "
        "targets plus KoLeo (DINOv3's multi-distillation; needs a teacher with heads); features = the "
        "student's CLS and patch features, through projectors, match the teacher's; auto = dinov3 when "
        "the teacher file has heads, else features")
    weight: float = setting(1.0, "weight of the feature-distillation loss", ge=0)
    loss: Literal["cosine", "smooth_l1", "cosine+smooth_l1"] = setting(
        "cosine", "feature distillation loss: 1 - cosine similarity, smooth L1 (the teacher features "
        "layer-normalised), or their sum")
    cls_weight: float = setting(1.0, "share of the CLS features in the feature loss", ge=0)
    patch_weight: float = setting(1.0, "share of the patch features in the feature loss (0 = CLS only)",
                                  ge=0)
    smooth_l1_beta: float = setting(1.0, "beta of the smooth L1 loss", gt=0)
    projector_hidden_dim: int = setting(
        0, "hidden width of the student -> teacher projectors (0 = one linear layer)", min=0, max=1 << 16)
    resample_mode: Literal["bilinear", "bicubic", "area", "nearest"] = setting(
        "bilinear", "how a student patch grid of another size is resampled to the teacher's")
    teacher_backbone: str | None = setting(
        None, "the teacher's architecture (a timm name) for backbone-only weights without dinokit metadata")
    teacher_kwargs: dict = setting({}, "extra timm.create_model arguments of teacher_backbone")
    checkpoint_teacher: bool = setting(
        False, "write the frozen teacher into training checkpoints (self-contained, larger by the "
        "teacher's size); off: a checkpoint records the teacher's fingerprint and a resumed run re-reads "
        "model.teacher, refusing weights that differ")


@dataclass
class CropSettings:
    """Multi-crop: how many crops of which size and scale each image gives."""

    preset: Literal["imagenet", "small"] = setting("imagenet", "augmentation defaults (imagenet: 224/96 "
                                                   "crops; small: for low-resolution sources)")
    source_size: int = setting(28, "for preset=small: size of the source images", min=4, max=1 << 14)
    global_size: int | None = setting(None, "global crop size (preset default if unset)", min=4, max=1 << 13)
    local_size: int | None = setting(None, "local crop size (preset default if unset)", min=4, max=1 << 13)
    n_global: int = setting(2, "global crops per image", min=1, max=16)
    n_local: int = setting(8, "local crops per image", min=0, max=64)
    global_scale: tuple = setting((0.4, 1.0), "RandomResizedCrop scale of global crops", scale=True)
    local_scale: tuple = setting((0.05, 0.4), "RandomResizedCrop scale of local crops", scale=True)


@dataclass
class DataSettings:
    """Where the images come from and how they are read."""

    dataset: Literal["folder", "shards", "fashion-mnist", "digits", "demo", "multiband", "scenes",
                     "scene-items"] = setting(
        "folder", "folder = your images under data.path; shards = WebDataset tar shards under "
        "data.path (dinokit data shard); demo = Fashion-MNIST, else digits; multiband = GeoTIFF/TIFF "
        "or .npy images with data.channels bands under data.path; scenes = 56 px scenes of 2-3 "
        "Fashion-MNIST items (the dense task, unlabelled here); scene-items = one item per scene at a "
        "random position and scale, labelled by its class")
    path: str | None = setting(None, "image folder (recursive; class sub-folders give labels), or for "
                               "shards: their folder, index.json or brace pattern")
    iterations_per_epoch: int | None = setting(None, "shards: batches per process per epoch (default: "
                                               "one pass over index.json's samples)", min=1)
    shuffle_buffer: int = setting(1000, "shards: sample shuffle buffer size (0 = read order)", min=0,
                                  max=1 << 24)
    val_path: str | None = setting(None, "labelled folder for validation loss and k-NN monitor")
    limit: int | None = setting(None, "use only the first N training images", min=1)
    val_limit: int | None = setting(None, "use only the first N validation images", min=1)
    batch_size: int = setting(64, "images per process per step", min=1, max=1 << 16)
    num_workers: int = setting(4, "DataLoader worker processes", min=0, max=256)
    strict_images: bool = setting(False, "fail on the first unreadable image (or damaged shard) instead of "
                                  "skipping it (the rest of the shard) with a warning")
    max_image_pixels: int = setting(
        250_000_000, "images with more pixels are refused as decompression bombs, by their header "
        "(Pillow's check; its own default, 89 Mpx, refuses genuine 100 Mpx photos)", min=1, max=1 << 40)
    channels: int = setting(3, "channels fed to the network: 1 or 3 (images), any count "
                            "(data.dataset=multiband; equal to backbone.kwargs.in_chans)", min=1, max=4096)
    mean: tuple | None = setting(None, "per-channel normalisation mean (1 or `channels` values; preset "
                                 "if unset)")
    std: tuple | None = setting(None, "per-channel normalisation std (1 or `channels` values; preset if "
                                "unset)")
    augment_on: Literal["workers", "device"] = setting(
        "workers", "workers = per-sample crops in the loader; device = batched crops of uint8 images on "
        "the training device (GPU when there is one)")


@dataclass
class OptimSettings:
    """Optimiser and its schedules (per optimiser step; LR scaled with the global batch)."""

    optimizer: Literal["adamw", "sgd", "lars"] = setting("adamw", "optimiser")
    lr: float | None = setting(
        None, "base learning rate for a global batch of lr_reference_batch (None = official: DINO/iBOT "
        "0.0005, DINOv2/v3 and distillation 0.004)", gt=0)
    lr_scaling: Literal["linear", "sqrt", "none"] | None = setting(
        None, "lr scaling rule with batch size (None = official: DINO/iBOT linear, DINOv2/v3 and "
        "distillation sqrt)")
    lr_reference_batch: int | None = setting(
        None, "reference batch of the scaling rule (None = official: DINO/iBOT 256, DINOv2/v3 and "
        "distillation 1024)", min=1, max=1 << 24)
    lr_schedule: Literal["warmup_cosine", "constant", "none"] = setting(
        "warmup_cosine", "warmup_cosine = linear warm-up then cosine to min_lr (official); constant; none "
        "= the caller owns the optimiser's lr (e.g. a torch scheduler)")
    min_lr: float = setting(1e-6, "learning rate at the end of the cosine", ge=0)
    warmup_epochs: float = setting(10, "epochs of linear lr warm-up", ge=0)
    warmup_start_lr: float = setting(0.0, "learning rate at the start of the warm-up", ge=0)
    weight_decay: float = setting(0.04, "weight decay at step 0", ge=0)
    weight_decay_end: float = setting(0.4, "weight decay at the last step (cosine)", ge=0)
    momentum: float = setting(0.9, "SGD/LARS momentum", ge=0, le=1)
    betas: tuple = setting((0.9, 0.999), "AdamW betas", betas=True)
    clip_grad: float = setting(3.0, "gradient clipping norm (0 = off)", ge=0)
    clip_mode: Literal["auto", "per_param", "per_module", "global", "none"] = setting(
        "auto", "auto = the method's official rule (DINO/iBOT: per_param, DINOv2/v3: per_module); "
        "per_param = DINO's per-tensor norm; per_module = backbone and each head by their own norm")
    no_decay_rule: Literal["auto", "dino", "dinov2", "dinov3", "dinokit"] = setting(
        "auto", "which parameters get no weight decay (auto = the method's official rule; dinokit = "
        "also tokens and positional embeddings)")
    freeze_last_layer_mode: Literal["auto", "cancel_grad", "zero_lr"] = setting(
        "auto", "how prototypes are frozen (auto: DINO/iBOT cancel gradients, DINOv2/v3 LR 0)")
    freeze_last_layer_epochs: float = setting(1, "epochs during which the prototypes stay frozen", ge=0)
    layer_decay: float | None = setting(
        None, "layer-wise lr decay over a ViT's blocks, 1 = off (None = official: DINO/iBOT 1, DINOv2/v3 "
        "and distillation 0.9)", gt=0, le=1)
    patch_embed_lr_mult: float | None = setting(
        None, "lr multiplier of the patch embedding (None = official: DINO/iBOT 1, DINOv2/v3 and "
        "distillation 0.2)", gt=0)


@dataclass
class TrainerSettings:
    """The Lightning Trainer and the run directory."""

    epochs: int = setting(100, "training epochs", min=1, max=1_000_000)
    max_steps: int = setting(-1, "stop after this many optimiser steps (-1 = epochs decide)", min=-1,
                        max=1 << 40)
    accelerator: str = setting("auto", "auto, cpu, gpu, cuda, mps or tpu", choices=ACCELERATORS)
    devices: str = setting("auto", "auto, a device count, -1 (all) or a list of indices", devices=True)
    num_nodes: int = setting(1, "nodes (torchrun / SLURM)", min=1, max=100_000)
    strategy: str = setting("auto", "auto, ddp, ddp_spawn, fsdp, deepspeed, ... (Lightning names)",
                       strategy=True)
    precision: str = setting("auto", "auto (bf16-mixed on a GPU with bf16, else 32), 32, bf16-mixed or "
                        "16-mixed (loss scaling), ...", choices=PRECISIONS)
    accumulate_grad_batches: int = setting(1, "gradient accumulation steps", min=1, max=1 << 14)
    seed: int = setting(0, "random seed (data order, augmentations, init)", min=0, max=2**32 - 1)
    output_dir: str = setting("runs", "parent folder of run directories")
    run_name: str | None = setting(None, "run directory name (default: timestamp + method)")
    resume: str | None = setting(
        None, "auto (newest good checkpoint of trainer.run_name, else start fresh), last, or a "
        "checkpoint path: continue that run exactly"
    )
    log_every_n_steps: int = setting(10, "logging interval in steps", min=1)
    checkpoint_every_n_steps: int | None = setting(None, "also checkpoint every N steps", min=1)
    keep_checkpoints: int = setting(
        1, "step checkpoints (checkpoint_every_n_steps) to keep, the newest; -1 = all, 0 = none "
        "(last.ckpt is kept whatever the value)", min=-1, max=1 << 40)
    knn_every_n_epochs: int = setting(0, "k-NN monitor interval on data.val_path (0 = off)", min=0)
    progress: bool = setting(True, "show a progress bar")
    compile: bool = setting(False, "torch.compile the method forward (student, teacher, heads, loss terms)")
    sync_batchnorm: bool = setting(
        True, "SyncBatchNorm in student and teacher with several GPU processes (BatchNorm models)"
    )
    stop_on_collapse: bool = setting(False, "exit non-zero when the collapse guard fires (else warn)")
    max_nonfinite_steps: int = setting(
        3, "stop after this many consecutive non-finite steps (each one is skipped on the device)", min=1)
    collapse_window: int = setting(500, "steps a teacher collapse must last before it is reported",
                              min=1, max=1 << 40)
    slurm_requeue: bool = setting(False, "on SIGUSR1/SIGTERM under SLURM: checkpoint, then scontrol requeue")


@dataclass
class StageSettings:
    """A span of the run with its own overrides.

    The stages run in order; each lasts ``steps`` optimiser steps, ``epochs`` epochs or a
    ``fraction`` of the run's steps. One stage may give no length: it lasts what the others leave
    (the last stage, which always runs to the end of the run, or one in the middle, e.g. the main
    stage between a head warm-up and a high-resolution stage). ``frozen`` names student parts kept
    fixed, teacher included: ``backbone``, ``heads`` (every head), a head by name (``head``,
    ``patch_head``) or ``patch_embed``. ``lr_mult`` scales the learning rate; ``warmup_epochs``
    warms it up again from the stage's first step; ``weights`` overrides loss-term weights by
    section name (``{gram: 0}``); ``crops`` overrides the crops of the samples drawn for the stage
    (e.g. DINOv3's high-resolution stage: ``{global_size: 512, local_size: 112}``);
    ``gram_teacher_size`` feeds the Gram teacher the stage's global crops resized to that size (in
    place of ``gram.teacher_size``: the high-resolution stage's Gram teacher sees higher resolution);
    ``teacher_momentum`` holds the EMA teacher's momentum constant over the stage (DINOv3's
    high-resolution adaptation runs its own schedule, a constant 0.999, where the run's cosine
    would be close to 1 and the teacher would no longer follow what the stage teaches).

    A head warm-up (the heads trained on a frozen pretrained backbone before it is unfrozen, so
    that fresh heads do not pull the pretrained features apart) may end before its length:
    ``until_teacher_entropy`` ends it once the teacher's targets carry information, and
    ``skip_with_init_heads`` skips it when ``model.init_weights`` gave trained heads. The steps it
    did not run go to the stage without a length that follows it (the stages after that keep their
    place), or else move the later stages up; the boundaries a run realised are saved in its
    checkpoints.
    """

    name: str = setting("stage", "the stage's name (logged as the stage metric and in checkpoints)")
    steps: int | None = setting(None, "length in optimiser steps", min=1)
    epochs: float | None = setting(None, "length in epochs (steps = round(epochs x steps per epoch))",
                                   gt=0)
    fraction: float | None = setting(None, "length as a fraction of the run's optimiser steps (steps = "
                                     "round(fraction x total steps)): the stage keeps its share whatever "
                                     "trainer.epochs is", gt=0, le=1)
    frozen: list = setting([], "student (and teacher) parts kept fixed: backbone, heads, a head's "
                           "name, patch_embed")
    lr_mult: float = setting(1.0, "multiplier of the scheduled learning rate", ge=0)
    warmup_epochs: float = setting(0.0, "warm the learning rate up again over these epochs from the "
                                   "stage's start (0 = no)", ge=0)
    weights: dict = setting({}, "loss-term weight overrides by section: dino, ibot, koleo, gram")
    crops: dict = setting({}, "crop overrides for the stage's samples: global_size, local_size, n_local, "
                          "global_scale, local_scale (the crops are made in the loader workers)")
    until_teacher_entropy: float | None = setting(
        None, "end the stage early once the teacher's mean target entropy (train/teacher_entropy) is "
        "below this fraction of ln K (K = dino.n_prototypes; 1 = uniform targets); read at the logging "
        "steps (trainer.log_every_n_steps); None = run the whole length", gt=0, le=1)
    skip_with_init_heads: bool = setting(
        False, "skip the stage when model.init_weights gives trained heads (a dinokit run or "
        "checkpoint): a head warm-up that is not needed")
    gram_teacher_size: int | None = setting(
        None, "Gram teacher input size during the stage (None = gram.teacher_size; the global crops are "
        "resized to it, the Gram teacher's patch grid resampled to the student's)", min=4)
    teacher_momentum: float | None = setting(
        None, "the EMA teacher's momentum held constant during the stage (None = the run's cosine "
        "schedule; DINOv3's high-resolution adaptation: 0.999)", ge=0, le=1)


#: Parts a stage may freeze besides head names.
FREEZABLE = ("backbone", "heads", "patch_embed")
#: Crop settings a stage may override.
STAGE_CROPS = ("global_size", "local_size", "n_local", "global_scale", "local_scale")
#: Loss-term sections whose weights a stage may override.
TERM_SECTIONS = ("dino", "ibot", "koleo", "gram", "distillation")


@dataclass
class MethodSettings:
    """What a method is built from: the backbone, the heads, the teacher and each loss term's
    section (a method uses the term sections it has: DINO ``dino``; iBOT ``dino`` and ``ibot``;
    DINOv2 also ``koleo``; DINOv3 also ``gram``). ``None`` fields are the method's official
    choices, filled in by :func:`dinokit.methods.registry.resolve_settings`."""

    backbone: BackboneSettings = field(default_factory=BackboneSettings)
    heads: HeadSettings = field(default_factory=HeadSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    dino: DinoSettings = field(default_factory=DinoSettings)
    ibot: IBOTSettings = field(default_factory=IBOTSettings)
    koleo: KoLeoSettings = field(default_factory=KoLeoSettings)
    gram: GramSettings = field(default_factory=GramSettings)
    distillation: DistillationSettings = field(default_factory=DistillationSettings)
    model: ModelSettings = field(default_factory=ModelSettings)

    @classmethod
    def from_config(cls, cfg: Any) -> MethodSettings:
        """The method's sections of a run config (:class:`dinokit.config.Config`)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})
