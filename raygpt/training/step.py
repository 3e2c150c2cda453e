"""One optimizer step of the recipe, shared by the training loop and the GPU check.

`train_step` is everything between two batches: the lr for this step, the per-step seed (dropout
draws from (seed, epoch, step, rank) alone, so a resumed run draws what an uninterrupted one
would), micro-batches reducing gradients only on the last (DDP's `no_sync`, FSDP2's
switch), autocast, backward, clipping (or only measuring the norm), a non-finite check before
anything is applied, the AdamW step.
Plain PyTorch: no Ray, no config object, no data set.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raygpt.errors import TrainingFailed
from raygpt.training import speed
from raygpt.training.schedule import clip_gradients, gradient_norm
from raygpt.training.sharding import full_value, gradient_sync


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Randomness of one step on one rank (dropout), from (seed, epoch, step, rank) alone, so a
    resumed run draws exactly what an uninterrupted one would."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DevicePrefetcher:
    """Micro-batches of `batches` copied to `device` (non-blocking from pinned memory on a GPU).
    `prefetch()` reads the next one and starts its copy early: `train_step` calls it just before
    its one host sync, so on a GPU the read overlaps the tail of backward instead of leaving the
    GPU idle after the optimizer step. Only the order of reads changes, never what is read."""

    def __init__(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device):
        self.batches, self.device = batches, device
        self.ready: tuple[torch.Tensor, torch.Tensor] | None = None
        self.exhausted = False

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ready is None:
            self.prefetch()
        if self.ready is None:
            raise StopIteration
        batch, self.ready = self.ready, None
        return batch

    def prefetch(self) -> None:
        if self.ready is not None or self.exhausted:
            return
        try:
            x, y = next(self.batches)
        except StopIteration:
            self.exhausted = True
            return
        self.ready = (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))


@dataclass
class StepResult:
    loss: torch.Tensor  # the last micro-batch's loss (detached, on the device)
    grad_norm: torch.Tensor  # the global gradient norm before clipping
    grad_norm_value: float = math.nan  # the same, read back (the step's one host sync)
    mean_loss: float | None = None  # with `mean_loss`: over micro-batches (and workers), read back in that sync


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    seed: int,
    max_norm: float | None,
    grad_accum_steps: int = 1,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
    step_label: str = "",
    mean_loss: bool = False,
) -> StepResult:
    """One optimizer step over `grad_accum_steps` micro-batches from `batches`; clip to
    `max_norm` (None: measure the norm only). A non-finite gradient norm raises TrainingFailed
    before the optimizer runs, so the weights stay as they were (`step_label` names the step).
    `mean_loss`: also the loss over all micro-batches and (under torch.distributed) all workers,
    read back in the same host sync as the norm (a collective: every rank passes the same)."""
    for group in optimizer.param_groups:  # µP's hidden-matrix groups step at a fraction of it
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
    torch.manual_seed(seed)
    loss_sum = torch.zeros((), device=device) if mean_loss else None
    for micro in range(grad_accum_steps):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with gradient_sync(model, enabled=micro == grad_accum_steps - 1):
            with speed.autocast(device, precision):
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            (loss / grad_accum_steps).backward()
        if loss_sum is not None:
            loss_sum += loss.detach()
    norm = clip_gradients(model.parameters(), max_norm) if max_norm is not None else gradient_norm(model.parameters())
    norm = full_value(norm)  # sharded gradients (fsdp): the norm over every shard
    # With DDP the gradients are all-reduced, so every rank sees the same norm and stops together.
    # One host sync per step (a device-side flag would let the bad step be applied first); the
    # next micro-batch is read while the device finishes.
    if isinstance(batches, DevicePrefetcher):
        batches.prefetch()
    mean = None
    if mean_loss:
        loss_mean = loss_sum / grad_accum_steps
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(loss_mean)
            loss_mean /= dist.get_world_size()
        value, mean = torch.stack([norm.detach().float(), loss_mean.float()]).tolist()
    else:
        value = norm.item()
    if not math.isfinite(value):
        raise TrainingFailed(f"non-finite gradient norm ({value}) at {step_label or 'this step'} "
                             f"(loss {loss.item():.4g}); nothing of this step was applied or saved: "
                             f"lower optim.peak_lr, or check the data")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss.detach(), norm, value, mean)
