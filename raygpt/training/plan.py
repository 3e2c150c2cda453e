"""The step plan (pure): micro-batch size and step counts of a config over a prepared data
folder. A config the trainer cannot run is a one-line UserError here, before anything starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from raygpt.config import Config, TrainConfig
from raygpt.data.shards import check_data_for_model, load_manifest
from raygpt.data.windows import num_windows
from raygpt.errors import UserError


@dataclass
class StepPlan:
    micro_batch: int  # sequences per worker per forward pass
    steps_per_epoch: int
    total_steps: int


def plan_steps(train: TrainConfig, num_train_windows: int, num_workers: int, context_len: int,
               warmup_steps: int) -> StepPlan:
    """Micro-batch and step counts; a config the trainer cannot run is a one-line UserError."""
    b, w, a = train.batch_size, num_workers, train.grad_accum_steps
    if b % (w * a):
        raise UserError(
            f"train.batch_size {b} does not divide over run.num_workers {w} x train.grad_accum_steps {a}; "
            f"use a multiple of {w * a}"
        )
    steps_per_epoch = num_train_windows // b
    if steps_per_epoch == 0:
        raise UserError(f"train.batch_size {b} is larger than the dataset ({num_train_windows} train windows)")
    candidates = [steps_per_epoch * train.num_epochs]
    if train.max_steps is not None or train.max_tokens is not None:
        candidates = []
        if train.max_steps is not None:
            candidates.append(train.max_steps)
        if train.max_tokens is not None:
            candidates.append(math.ceil(train.max_tokens / (b * context_len)))
    total = min(candidates)
    if warmup_steps >= total:
        raise UserError(f"optim.warmup_steps {warmup_steps} must be < total steps {total}")
    return StepPlan(b // (w * a), steps_per_epoch, total)


def plan_for(cfg: Config, data_dir: str, manifest: dict[str, Any] | None = None) -> StepPlan:
    """The plan of a config over a prepared data folder (reads only the manifest, unless given)."""
    manifest = manifest or load_manifest(data_dir)
    check_data_for_model(manifest, data_dir, cfg.model.vocabulary_size)
    stride = cfg.data.stride or cfg.model.context_len
    windows = num_windows(manifest["splits"]["train"]["tokens"], cfg.model.context_len, stride)
    if windows == 0:
        raise UserError(f"{data_dir}: the train split holds no window of context_len {cfg.model.context_len}")
    if manifest["splits"]["val"]["tokens"] <= cfg.model.context_len:
        raise UserError(f"{data_dir}: the val split holds no window of context_len {cfg.model.context_len}; "
                        "prepare with a larger --val-fraction or more data")
    return plan_steps(cfg.train, windows, cfg.run.num_workers, cfg.model.context_len, cfg.optim.warmup_steps)
