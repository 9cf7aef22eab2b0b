"""The training recipe: one typed, validated dataclass per YAML section, layered as defaults → the model family's
training defaults → recipe file → ``--set section.key=value`` (dinov2 ``utils/config.py`` / minGPT ``CfgNode``
convention). Family defaults are the official fine-tuning values a family registers (BEiT: ``optim.layer_decay``
0.65 base / 0.75 large); they fill only keys the recipe leaves out, and the resolved config.yaml shows them.

Everything that can be checked without data is checked here, before a run folder exists: unknown keys and ill-typed
values (``vitkit.config.from_dict``), ranges, the model name and its architecture overrides, batch/accumulation
divisibility, and combinations that cannot work (a distillation without a teacher). ``resolve`` returns the config
a run actually uses; it is written to ``RUN_DIR/config.yaml`` and read back by ``--resume``.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from vitkit.config import ConfigError, apply_dotted, check_value, from_dict, merge, to_dict
from vitkit.data import AugmentConfig, DataConfig

__all__ = ["ModelSection", "OptimConfig", "DistillConfig", "TrainSection", "LogConfig", "RecipeConfig",
           "load_recipe", "resolve", "dump_yaml", "RESUME_SETTABLE"]

# Keys ``--resume`` may change: they do not alter the arithmetic of training (paths, workers, logging).
RESUME_SETTABLE = ("data.root", "data.num_workers", "data.download", "log.")


@dataclass
class ModelSection:
    """Which registered variant to build and how (the arguments of ``vitkit.create_model``)."""

    name: str = "vit_tiny_patch16_224"
    # a checkpoint file or folder in any format; true (or "true") = the variant's named weights from the catalog,
    # downloaded once into the verified cache (`vitkit models --pretrained` lists them); "./true" is a path
    pretrained: str | bool | None = None
    num_classes: int | None = None  # None: the dataset's class count (a new zero-initialised head if they differ)
    img_size: int | None = None  # None: data.img_size (the two are kept equal)
    overrides: dict[str, Any] = field(default_factory=dict)  # architecture overrides, e.g. {depth: 7, embed_dim: 256}
    # how the checkpoint's position table is resized for img_size; None: as its source's code does (load report)
    pos_embed_resize: str | None = None

    def validate(self) -> None:
        from vitkit.registry import check_pos_embed_resize, get_spec
        try:
            spec = get_spec(self.name)
        except ValueError as e:
            raise ConfigError(f"model.name: {e}") from None
        self.pretrained = _named_or_path(self.pretrained, spec, "model.pretrained")
        try:
            check_pos_embed_resize(spec, self.pos_embed_resize, bool(self.pretrained))
        except ValueError as e:
            raise ConfigError(f"model.pos_embed_resize: {e}") from None
        for key in ("num_classes", "img_size"):
            if key in self.overrides:
                raise ConfigError(f"model.overrides.{key}: set model.{key} instead")
        arch = {**spec.config, **self.overrides}
        if self.img_size is not None:
            arch["img_size"] = self.img_size
        if self.num_classes is not None:
            arch["num_classes"] = self.num_classes
        from_dict(spec.model_cls.config_cls, arch, where="model.overrides")  # create_model's check, done early


def _named_or_path(value: str | bool | None, spec, key: str) -> str | bool | None:
    """``true`` in any spelling → True: the catalog's named weights, which the variant must have (checked now, before
    any data is read). Anything else is returned as it is (a path, or null / false: no weights)."""
    from vitkit.weights.hub import no_named_weights_reason, requests_named_weights
    if not requests_named_weights(value):
        return value
    if spec.weights is None:
        reason = no_named_weights_reason(spec)
        raise ConfigError(f"{key}: true asks for the named weights of {spec.name}, which has none"
                          + (f": {reason}; download the file by hand and give its path" if reason else
                             "; give a checkpoint path (`vitkit models --pretrained` lists the variants with named "
                             "weights)"))
    return True


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (per optimiser step)."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    lr_base_batch: int | None = None  # linear scaling rule (Goyal et al.; DeiT): lr * batch_size / lr_base_batch
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    eps: float = 1e-8  # adamw
    layer_decay: float | None = None  # BEiT/MAE layer-wise LR decay, e.g. 0.65; None = off (BEiT: family default)
    # fine-tuning: the parameters of the first N layer ids (0 = embeddings, i + 1 = block i: the model's layer_id)
    # stay as loaded and get no gradient, so the backward pass stops above them; 0 = train everything
    freeze_layers: int = 0
    clip_grad: float | None = None  # max global gradient norm; None = off
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # converted to steps; at most one of warmup_steps / warmup_epochs may be set
    min_lr: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be positive, got {self.lr}")
        if self.lr_base_batch is not None and self.lr_base_batch <= 0:
            raise ConfigError(f"optim.lr_base_batch: must be positive, got {self.lr_base_batch}")
        if self.weight_decay < 0 or self.min_lr < 0 or self.eps <= 0:
            raise ConfigError("optim.weight_decay and optim.min_lr must be >= 0, optim.eps > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optim.momentum: must be in [0, 1), got {self.momentum}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: each must be in [0, 1), got {self.betas}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay: must be in (0, 1], got {self.layer_decay}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"optim.clip_grad: must be positive or null, got {self.clip_grad}")
        if self.freeze_layers < 0:
            raise ConfigError(f"optim.freeze_layers: must be >= 0, got {self.freeze_layers}")
        if self.warmup_steps < 0 or self.warmup_epochs < 0:
            raise ConfigError("optim.warmup_steps / warmup_epochs: must be >= 0")
        if self.warmup_steps and self.warmup_epochs:
            raise ConfigError("optim: set warmup_steps or warmup_epochs, not both")


@dataclass
class DistillConfig:
    """DeiT distillation (facebookresearch/deit ``losses.py``), used when ``train.task: distill``."""

    type: Literal["hard", "soft"] = "hard"  # DeiT's best: hard (teacher argmax as the label of the dist token)
    alpha: float = 0.5  # loss = (1 - alpha) * base + alpha * distillation (DeiT default 0.5; paper soft: 0.1)
    tau: float = 1.0  # soft-distillation temperature (DeiT default 1.0; paper soft: 3.0)
    teacher: str | None = None  # a vitkit model folder / run folder, or a registered name with teacher_pretrained
    teacher_pretrained: str | bool | None = None  # weights for a teacher given by name; true = its named weights

    def validate(self) -> None:
        from vitkit.weights.hub import requests_named_weights
        if self.teacher and requests_named_weights(self.teacher_pretrained) and not os.path.isdir(self.teacher):
            from vitkit.registry import get_spec
            try:
                spec = get_spec(self.teacher)
            except ValueError as e:
                raise ConfigError(f"train.distillation.teacher: {e}") from None
            self.teacher_pretrained = _named_or_path(self.teacher_pretrained, spec,
                                                     "train.distillation.teacher_pretrained")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"train.distillation.alpha: must be in [0, 1], got {self.alpha}")
        if self.tau <= 0:
            raise ConfigError(f"train.distillation.tau: must be positive, got {self.tau}")


@dataclass
class MimConfig:
    """Masked image modelling (Bao et al. 2021, "BEiT", §2.3), used when ``train.task: mim``: blockwise masks of the
    patch grid (microsoft/unilm beit/masking_generator.py), the targets a visual tokenizer's ids of each image."""

    tokenizer: str | None = None  # a vitkit VQ tokenizer folder, or a DALL-E encoder.pkl (vitkit.tokenizers)
    mask_ratio: float = 0.4  # of the patches masked per image (BEiT: 75 of 196 at 224/16)
    min_block_patches: int = 16  # the smallest block (BEiT: --min_mask_patches_per_block 16)
    max_block_patches: int | None = None  # None: up to the remaining budget
    min_aspect: float = 0.3  # block aspect ratios in [min_aspect, 1 / min_aspect]
    eval_seed: int = 0  # the validation masks: the same every evaluation

    def validate(self) -> None:
        if self.tokenizer is not None and not os.path.exists(self.tokenizer):
            raise ConfigError(f"train.mim.tokenizer: {self.tokenizer}: no such file or folder")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"train.mim.mask_ratio: must be in (0, 1), got {self.mask_ratio}")
        if self.min_block_patches <= 0:
            raise ConfigError(f"train.mim.min_block_patches: must be positive, got {self.min_block_patches}")
        if self.max_block_patches is not None and self.max_block_patches < self.min_block_patches:
            raise ConfigError("train.mim.max_block_patches: must be >= min_block_patches")
        if not 0.0 < self.min_aspect <= 1.0:
            raise ConfigError(f"train.mim.min_aspect: must be in (0, 1], got {self.min_aspect}")


@dataclass
class TrainSection:
    """Length, batch, precision, determinism, evaluation and checkpoint cadence."""

    epochs: float | None = None  # training length in epochs of the train split ...
    steps: int | None = None  # ... or in optimiser steps (wins over epochs)
    time_budget_minutes: float | None = None  # wall-clock budget: the schedule is laid out over the steps that fit
    budget_calibration_steps: int = 20  # steps timed (after 3 warm-up steps) to plan a time-budgeted run
    batch_size: int = 128  # global batch per optimiser step: summed over accumulation micro-steps and processes
    accum_steps: int = 1  # micro-batches per optimiser step (micro-batch = batch_size / accum_steps / processes)
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) + fixed threads: bitwise resumable
    threads: int | None = None  # intra-op threads per process; None = CPU cores / local processes
    # auto: bf16 autocast where the device runs bf16 natively, else fp32 (vitkit.hardware); none: fp32;
    # bf16: autocast on any device (emulated, slow, on CPUs without native bf16); fp16: autocast + GradScaler (loss
    # scaling; overflowing steps are skipped, on every process alike), emulated and slow on CPUs without native fp16
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the model (under fsdp: each block, before sharding)
    # NHWC memory order for the model's 4-d weights and every training batch (torch.channels_last): for families
    # with overlapping convolutions (FamilyModel.convolutional); not with strategy fsdp (FSDP2 shards contiguous
    # parameters only)
    channels_last: bool = False
    # several processes: ddp replicates the model (DistributedDataParallel); fsdp shards parameters, gradients and
    # optimizer state over them (FSDP2, per block of the family contract). One process trains plainly with either;
    # fsdp's train state is saved sharded (DCP) even then, so a run resumes on any number of processes
    strategy: Literal["ddp", "fsdp"] = "ddp"
    grad_checkpointing: bool = False  # recompute each block's activations in the backward pass (less memory)
    ema: bool = False  # keep an exponential moving average of the weights; it is evaluated and saved as best/
    ema_decay: float = 0.9998
    ema_warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)) (TF ExponentialMovingAverage num_updates)
    eval_every: int = 0  # optimiser steps between validations; 0 = once per epoch
    eval_tta: Literal["none", "hflip"] = "none"  # hflip: validate and test on the mean logits of image + mirror
    checkpoint_every_steps: int = 0  # periodic checkpoints/last/; 0 = at each validation only
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    task: Literal["classify", "distill", "mim"] = "classify"
    distillation: DistillConfig = field(default_factory=DistillConfig)
    mim: MimConfig = field(default_factory=MimConfig)

    def validate(self) -> None:
        if self.steps is None and self.epochs is None and self.time_budget_minutes is None:
            raise ConfigError("train: set train.epochs, train.steps or train.time_budget_minutes")
        if self.steps is not None and self.steps <= 0:
            raise ConfigError(f"train.steps: must be positive, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train.epochs: must be positive, got {self.epochs}")
        if self.time_budget_minutes is not None and self.time_budget_minutes <= 0:
            raise ConfigError(f"train.time_budget_minutes: must be positive, got {self.time_budget_minutes}")
        for name in ("batch_size", "accum_steps", "budget_calibration_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}: must be positive, got {getattr(self, name)}")
        if self.batch_size % self.accum_steps:
            raise ConfigError(f"train.batch_size {self.batch_size} is not divisible by train.accum_steps "
                              f"{self.accum_steps}")
        if self.eval_every < 0 or self.checkpoint_every_steps < 0:
            raise ConfigError("train.eval_every / checkpoint_every_steps: must be >= 0")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"train.threads: must be positive or null, got {self.threads}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay: must be in (0, 1), got {self.ema_decay}")
        if self.channels_last and self.strategy == "fsdp":
            raise ConfigError("train.channels_last: FSDP2 shards contiguous parameters only (torch/distributed/fsdp/"
                              "_fully_shard/_fsdp_param.py refuses channels_last weights); use train.strategy ddp")
        if self.task == "distill" and not self.distillation.teacher:
            raise ConfigError("train.distillation.teacher: required when train.task is 'distill'")
        if self.task == "mim" and not self.mim.tokenizer:
            raise ConfigError("train.mim.tokenizer: required when train.task is 'mim' (a VQ tokenizer folder "
                              "trained with `python -m vitkit.tokenizers`, or a DALL-E encoder.pkl)")


@dataclass
class LogConfig:
    progress: bool = True  # tqdm bar with loss, accuracy, images/s and ETA (log lines when off)
    tensorboard: bool = True  # event files in RUN_DIR/tensorboard when the tensorboard package is installed
    plots: bool = True  # PNG curves in RUN_DIR/plots (matplotlib, Agg)
    test_curve: bool = False  # also evaluate the test split at each validation, for accuracy-vs-time plots only
    every_steps: int = 20  # training loss/accuracy are averaged and logged over this many steps

    def validate(self) -> None:
        if self.every_steps <= 0:
            raise ConfigError(f"log.every_steps: must be positive, got {self.every_steps}")


@dataclass
class RecipeConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(name="fake"))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=lambda: TrainSection(steps=100))
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        if self.model.img_size is not None and self.model.img_size != self.data.img_size:
            raise ConfigError(f"model.img_size {self.model.img_size} differs from data.img_size "
                              f"{self.data.img_size}; set one of them")


def _sync_img_size(raw: dict[str, Any]) -> dict[str, Any]:
    """``model.img_size`` and ``data.img_size`` name one number: whichever is given fills the other."""
    model, data = raw.setdefault("model", {}), raw.setdefault("data", {})
    if not isinstance(model, dict) or not isinstance(data, dict):
        return raw
    for section, values in (("data", data), ("model", model)):
        # checked here, naming the key the user wrote: the model's own checks would see only "img_size"
        if values.get("img_size") is not None:
            size = check_value(values["img_size"], int, f"{section}.img_size")
            if size <= 0:
                raise ConfigError(f"{section}.img_size: must be positive, got {size}")
    if model.get("img_size") is not None and "img_size" not in data:
        data["img_size"] = model["img_size"]
    elif data.get("img_size") is not None and model.get("img_size") is None:
        model["img_size"] = data["img_size"]
    return raw


def _family_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """The chosen variant's training defaults (``Family(train_defaults=...)``, e.g. BEiT's official
    ``optim.layer_decay`` 0.65) under the recipe: a key the recipe sets, even to null, wins."""
    model = raw.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    if not isinstance(name, str):
        return raw
    from vitkit.registry import get_spec
    try:
        defaults = get_spec(name).train_defaults
    except ValueError:
        return raw  # an unknown name: ModelSection.validate names it
    return merge(copy.deepcopy(defaults), raw)


def resolve(raw: dict[str, Any] | RecipeConfig) -> RecipeConfig:
    """A plain (possibly partial) recipe dict → a validated ``RecipeConfig``; ``ConfigError`` names a bad key.

    Layers, lowest first: the dataclass defaults, the model family's training defaults, then ``raw``. A resolved
    ``RecipeConfig`` (or a run's saved config.yaml) sets every key, so resolving it again changes nothing."""
    if isinstance(raw, RecipeConfig):
        raw = to_dict(raw)
    raw = _family_defaults(_sync_img_size(copy.deepcopy(raw)))
    return from_dict(RecipeConfig, raw)


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    if os.path.isdir(path):
        run = os.path.isfile(os.path.join(path, "config.yaml"))
        raise IsADirectoryError(f"recipe {path} is a folder, not a YAML file"
                                + (f" (to continue that run: --resume {path})" if run else ""))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a YAML text file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def load_recipe(path: str | os.PathLike | None, sets: list[str] = (), base: dict[str, Any] | None = None
                ) -> RecipeConfig:
    """defaults → ``base`` (e.g. a run's resolved config) → the recipe file → ``--set`` assignments, validated."""
    raw = copy.deepcopy(base or {})
    if path is not None:
        raw = merge(raw, _read_yaml(path))
    for assignment in sets:
        apply_dotted(raw, assignment)
    return resolve(raw)


def dump_yaml(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
