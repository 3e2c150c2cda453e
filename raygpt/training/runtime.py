"""The seam between the loop and what runs it (Ray Train, torchrun, one process, a Tune trial):
the `Runtime` the caller hands in, and the `TrainState` the loop advances and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from raygpt.errors import UserError


@dataclass
class Runtime:
    """What the code around the loop provides."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    run_dir: str | None = None  # the run's folder (a path or storage URI): metrics log, checkpoints
    fit_id: str = ""  # one per `fit`: tells a restart within it from a resume of an earlier one
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    wrap_loader: Callable[[DataLoader], DataLoader] = lambda d: d
    # `ray.train.report` under Ray Train, and its stand-in elsewhere (named after it on purpose):
    # called on every rank at the same points (Ray's report is a barrier); the checkpoint folder
    # and its name are given on rank 0 only, and the folder is deleted once report returns.
    report: Callable[[dict[str, Any], str | None, str | None], None] = lambda metrics, folder, name: None
    log: Callable[[str], None] = print
    # Steps that also save a checkpoint (besides every save_freq and the end): a search saves
    # where early stopping may stop a trial, so a stopped trial keeps where it stopped.
    extra_save_steps: frozenset[int] = frozenset()
    # The search this run is a trial of (its name), or None: MLflow and W&B group its trials by it.
    experiment: str | None = None


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches consumed in this epoch
    tokens_seen: int = 0
    elapsed: float = 0.0  # wall seconds of training before this process took over

    def advance(self, tokens: int, steps_per_epoch: int) -> None:
        """One optimizer step done; an epoch's last step rolls over at once, so a checkpoint here
        says "next epoch, batch 0"."""
        self.step += 1
        self.batch_in_epoch += 1
        self.tokens_seen += tokens
        if self.batch_in_epoch >= steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def checkpoint_fields(self, batch_size: int) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "samples_consumed": self.step * batch_size, "tokens_seen": self.tokens_seen,
                # The metrics log is cut back to this step when a run restores this checkpoint.
                "metrics_log_through_step": self.step}


def process_device(use_gpu: bool, local_rank: int, cuda_count: int) -> torch.device:
    """The device of a process that is not a Ray Train worker (torchrun's ranks, `--no-ray`, a
    Tune trial, where Ray makes the trial's GPU cuda:0): its own GPU, `cuda:<local_rank>`, when
    the run asks for GPUs. A run that asks for GPUs never falls back to the CPU in silence."""
    if not use_gpu:
        return torch.device("cpu")
    if cuda_count == 0:
        raise UserError(f"run.use_gpu is true but this torch sees no GPU (torch {torch.__version__}"
                        f"{', a CPU build' if torch.version.cuda is None else ''}): install a CUDA build of torch "
                        "on this node, or set run.use_gpu=false")
    if local_rank >= cuda_count:
        raise UserError(f"LOCAL_RANK {local_rank} but this node has {cuda_count} GPUs: start at most one process "
                        f"per GPU (torchrun --nproc-per-node={cuda_count})")
    return torch.device("cuda", local_rank)
