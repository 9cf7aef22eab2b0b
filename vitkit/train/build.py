"""Recipe → the objects a run is made of: model, data loaders, task, optimiser, schedule. Each builder takes only the
config sections it uses."""
from __future__ import annotations

import dataclasses
import functools
import os
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

import vitkit
from vitkit.runs import is_run_folder, run_checkpoint
from vitkit.data import (AugmentConfig, DataConfig, MixupCutmix, Splits, TransformDataset, build_eval_transform,
                         build_splits, build_train_transform, collate_skip_none)
from vitkit.data.shards import ShardStream
from vitkit.train.config import OptimConfig, RecipeConfig, TrainSection
from vitkit.train.distributed import DistInfo, StepBatchSampler
from vitkit.train.process import ignore_signals_in_worker
from vitkit.train.schedule import WarmupSchedule
from vitkit.train.tasks import (ClassifyTask, DistillTask, MaskedImageModellingTask, TeacherInput, TokenizerInput,
                                load_teacher)

__all__ = ["Data", "build_model", "build_data", "build_splits", "build_task", "build_schedule", "peak_lr",
           "eval_loader",
           "total_steps"]

log = logging.getLogger(__name__)


def build_model(cfg: RecipeConfig, num_classes: int) -> nn.Module:
    """``create_model`` from the recipe's model section; preprocessing in ``model.data_cfg`` becomes what training
    used (so a saved model is evaluated and predicted as it was trained). Masked-image modelling builds the model
    without a classifier and with a head over the tokenizer's vocabulary."""
    m = cfg.model
    overrides = dict(m.overrides)
    if cfg.train.task == "mim":
        num_classes = 0
        overrides.setdefault("mim_vocab_size", load_tokenizer(cfg.train.mim.tokenizer).vocab_size)
    pretrained = m.pretrained
    if isinstance(pretrained, str) and is_run_folder(pretrained):  # e.g. a pre-training run: its best, else last
        pretrained = run_checkpoint(pretrained)
    model = vitkit.create_model(m.name, pretrained=pretrained, num_classes=m.num_classes or num_classes,
                                img_size=cfg.data.img_size, pos_embed_resize=m.pos_embed_resize, **overrides)
    mean, std = data_stats(cfg.data, model)
    model.data_cfg = dataclasses.replace(model.data_cfg, mean=mean, std=std, interpolation=cfg.data.interpolation,
                                         crop_pct=cfg.data.crop_pct, crop_mode=cfg.data.crop_mode, label_set=None)
    return model


def data_stats(data: DataConfig, model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation: the recipe's ``data.mean/std``, else the model's own (e.g. 0.5/0.5 for Google's ViTs)."""
    return tuple(data.mean or model.data_cfg.mean), tuple(data.std or model.data_cfg.std)


@dataclass
class Data:
    splits: Splits
    train: TransformDataset
    val: TransformDataset | None
    test: TransformDataset | None
    sampler: StepBatchSampler | ShardStream  # the data position: steps_per_epoch, set_position
    loader: DataLoader

    @property
    def classes(self) -> list[str]:
        return self.splits.classes


def build_data(cfg: RecipeConfig, splits: Splits, model: nn.Module, info: DistInfo, pin_memory: bool = False
               ) -> Data:
    """Transforms from ``model.data_cfg`` (set by ``build_model``), the resumable sampler and the train loader."""
    mean, std, order = model.data_cfg.mean, model.data_cfg.std, model.data_cfg.channel_order  # BGR: MobileViT
    seed = cfg.train.seed
    train = TransformDataset(splits.train, build_train_transform(cfg.augment, cfg.data, mean, std,
                                                                 channel_order=order), seed)
    eval_tf = build_eval_transform(cfg.data, mean, std, channel_order=order)
    val = TransformDataset(splits.val, eval_tf, seed) if splits.val is not None and len(splits.val) else None
    test = TransformDataset(splits.test, eval_tf, seed) if splits.test is not None and len(splits.test) else None
    sampler = StepBatchSampler(len(train), cfg.train.batch_size, cfg.train.accum_steps, info.rank,
                               info.world_size, seed)
    if cfg.data.name == "shards":  # the train split streams from the sampler's position
        d = cfg.data
        stream = ShardStream(splits.train.index, train.transform, sampler, d.shard_streams, d.shuffle_buffer)
        if info.is_main:  # it evaluates: val and test are read now, so its eval workers inherit them
            for split in (val, test):
                if split is not None:
                    split.base.load()
        return Data(splits, train, val, test, stream, _shard_loader(stream, d.num_workers, pin_memory, seed))
    workers = cfg.data.num_workers
    loader = DataLoader(train, batch_sampler=sampler, num_workers=workers, collate_fn=collate_skip_none,
                        pin_memory=pin_memory, worker_init_fn=ignore_signals_in_worker if workers else None,
                        generator=torch.Generator().manual_seed(seed))  # workers' base seed: not the global RNG
    return Data(splits, train, val, test, sampler, loader)


def _shard_loader(stream: ShardStream, num_workers: int, pin_memory: bool, seed: int) -> DataLoader:
    """One worker per stream (its micro-batches arrive round-robin), or every stream in this process."""
    workers = stream.streams if num_workers else 0
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      worker_init_fn=ignore_signals_in_worker if workers else None,
                      generator=torch.Generator().manual_seed(seed))  # workers' base seed: not the global RNG


def eval_loader(dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_skip_none, worker_init_fn=ignore_signals_in_worker if num_workers else None)


def _mixup(aug: AugmentConfig, num_classes: int) -> MixupCutmix | None:
    if not aug.mixup_active:
        return None
    return MixupCutmix(aug.mixup, aug.cutmix, aug.mixup_prob, aug.mixup_switch_prob, aug.label_smoothing,
                       num_classes)


@functools.lru_cache(maxsize=2)
def load_tokenizer(path: str) -> nn.Module:
    """A visual tokenizer (``vitkit.tokenizers``): a VQ tokenizer folder, a DALL-E ``encoder.pkl`` (its tensors read
    without running its code) or that encoder converted to ``.safetensors``. Read once per process: the model's
    vocabulary and the task's targets come from the same file."""
    from vitkit.tokenizers import VQVAE, DalleEncoder
    if os.path.isdir(path):
        return VQVAE.load(path)
    if path.endswith(".safetensors"):
        return DalleEncoder.load_safetensors(path)
    return DalleEncoder.from_pickle(path)


def build_mim_task(cfg: RecipeConfig, model: nn.Module, device: torch.device) -> MaskedImageModellingTask:
    """Blockwise masks over the model's patch grid (read off ``feature_info``: the input size over the last map's
    reduction) and the tokenizer's view of each image at that grid."""
    from vitkit.data.masking import BlockwiseMasking
    mim = cfg.train.mim
    tokenizer = load_tokenizer(mim.tokenizer).to(device)
    _, H, W = model.data_cfg.input_size
    reduction = model.feature_info[-1]["reduction"]
    grid = (H // reduction, W // reduction)
    masking = BlockwiseMasking(grid, round(mim.mask_ratio * grid[0] * grid[1]), mim.min_block_patches,
                               mim.max_block_patches, mim.min_aspect)
    size = (grid[0] * tokenizer.downsample, grid[1] * tokenizer.downsample)
    view = TokenizerInput(tuple(model.data_cfg.mean), tuple(model.data_cfg.std), size)
    return MaskedImageModellingTask(tokenizer, masking, view, mim.eval_seed)


def build_task(cfg: RecipeConfig, model: nn.Module, device: torch.device):
    if cfg.train.task == "mim":
        return build_mim_task(cfg, model, device)
    classify = ClassifyTask(model.num_classes, _mixup(cfg.augment, model.num_classes), cfg.augment.label_smoothing)
    if cfg.train.task == "classify":
        return classify
    d = cfg.train.distillation
    teacher = load_teacher(d.teacher, d.teacher_pretrained).to(device)
    if teacher.num_classes != model.num_classes:
        raise ValueError(f"train.distillation.teacher has {teacher.num_classes} classes, the student "
                         f"{model.num_classes}")
    t_cfg = teacher.data_cfg
    adapt = TeacherInput(tuple(model.data_cfg.mean), tuple(model.data_cfg.std), tuple(t_cfg.mean),
                         tuple(t_cfg.std), tuple(t_cfg.input_size[1:]))
    return DistillTask(classify, teacher, d.type, d.alpha, d.tau, adapt)


def peak_lr(optim: OptimConfig, batch_size: int) -> float:
    """The recipe's ``lr``, linearly scaled by ``batch_size / lr_base_batch`` when that is set (DeiT: 5e-4 · B/512)."""
    return optim.lr * batch_size / optim.lr_base_batch if optim.lr_base_batch else optim.lr


def total_steps(train: TrainSection, steps_per_epoch: int) -> int | None:
    """Optimiser steps from ``steps`` or ``epochs``; None when only a time budget bounds the run."""
    if train.steps is not None:
        return train.steps
    if train.epochs is not None:
        return max(1, math.ceil(train.epochs * steps_per_epoch))
    return None


def build_schedule(optim: OptimConfig, lr: float, total: int, steps_per_epoch: int,
                   warmup: int | None = None) -> WarmupSchedule:
    """Warm-up + decay over ``total`` steps; ``warmup`` overrides the recipe's (e.g. shortened for a short plan)."""
    if warmup is None:
        warmup = optim.warmup_steps or round(optim.warmup_epochs * steps_per_epoch)
    return WarmupSchedule(lr, total, min(warmup, total), optim.min_lr, optim.schedule)
