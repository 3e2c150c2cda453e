"""The learning-rate schedule and the clipping rule of the training recipe (pure functions).

Both take the optimizer step, never scheduler state, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:  # only torch at run time: the GPU check imports this with no PyYAML
    from raygpt.config import OptimConfig


def warmup_cosine_lr(
    step: int, total_steps: int, warmup_steps: int, initial_lr: float, peak_lr: float, min_lr: float
) -> float:
    """Linear warmup from `initial_lr` to `peak_lr` over `warmup_steps`, then cosine to `min_lr`
    at `total_steps`, exactly as docs/recipe.md states it."""
    if step < warmup_steps:
        return initial_lr + step * (peak_lr - initial_lr) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))



def lr_at(step: int, total_steps: int, optim: OptimConfig) -> float:
    """The lr of optimizer step `step` (0-based) of a run of `total_steps`, under `optim`'s schedule."""
    return warmup_cosine_lr(step, total_steps, optim.warmup_steps, optim.initial_lr, optim.peak_lr, optim.min_lr)

def should_clip(step: int, warmup_steps: int, clip_during_warmup: bool = False) -> bool:
    """Clip from the first step after warmup (`>=`; the recipe's original `>` skips that step, a known
    off-by-one fixed upstream), or from step 0 with `clip_during_warmup`."""
    return clip_during_warmup or step >= warmup_steps


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global 2-norm is at most `max_norm`; return the norm before."""
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm=max_norm)


def gradient_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The gradients' global 2-norm, without scaling them (the steps that are not clipped)."""
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
