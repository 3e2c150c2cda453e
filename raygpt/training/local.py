"""The loop without Ray: one process, or DDP under `torchrun` (`raygpt train --no-ray`). The run
folder is written as Ray Train would write it, so `raygpt runs`, resume and analysis read it alike."""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable

import torch
import torch.distributed as dist

from raygpt import runs, storage
from raygpt.config import Config
from raygpt.data.shards import check_shards, load_manifest
from raygpt.errors import UserError
from raygpt.runs import new_run_name, resume_paths
from raygpt.training.loop import train_loop
from raygpt.training.runtime import Runtime, process_device


def save_to_run_dir(run_dir: str, keep: int | None = None) -> Callable[[dict[str, Any], str | None, str | None], None]:
    """The report of a run without Ray Train: copy each checkpoint into the run folder, and with
    `keep`, keep only that many (best by val_loss) plus the newest, as Ray Train would."""

    def report(metrics: dict[str, Any], folder: str | None, name: str | None) -> None:
        if folder is not None and name is not None:
            storage.upload(folder, storage.join(run_dir, name))
            if keep is not None:
                runs.prune_checkpoints(run_dir, keep)

    return report


def run_without_ray(cfg: Config, data_dir: str, run_dir: str) -> dict[str, Any]:
    """The same loop with no Ray: one process, or DDP under `torchrun` (gloo on CPU, NCCL on GPU).
    A run folder that already holds checkpoints is resumed from the newest valid one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = process_device(cfg.run.use_gpu, int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())
    use_cuda = device.type == "cuda"
    if use_cuda:
        # Before the process group: NCCL's first collective otherwise puts every rank on cuda:0.
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    own_group = False
    if world == 1 and cfg.run.strategy == "fsdp" and not dist.is_initialized():
        # FSDP2 shards over a process group, here one of this process alone (the same run resumes
        # on more workers, or fewer, from its checkpoints).
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if use_cuda else None)
        own_group = True

    def ddp(model: torch.nn.Module) -> torch.nn.Module:
        if world == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None,
                                                         gradient_as_bucket_view=True)

    cfg.run.num_workers = world  # the plan divides the batch over the processes actually running
    rt = Runtime(rank=rank, world_size=world, device=device, run_dir=run_dir, fit_id=uuid.uuid4().hex,
                 wrap_model=ddp, report=save_to_run_dir(run_dir) if rank == 0 else (lambda m, f, n: None))
    try:
        return train_loop(cfg, data_dir, rt)
    finally:
        if world > 1 or own_group:
            dist.destroy_process_group()


def train_without_ray(cfg: Config, resume: str | None) -> None:
    """`raygpt train --no-ray`: the plain loop in this process (torchrun: one rank per process),
    run.cpus_per_worker threads each; a run folder with checkpoints resumes from the newest.
    Rank 0 holds the run's lease, as the driver does on Ray (`raygpt.training.ray_train.train`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (cfg.run.name or resume):
        raise UserError("under torchrun every rank must name the same run: set run.name")
    run_dir = (resume_paths(resume, cfg.run.storage_path).uri if resume
               else storage.join(runs.check_storage_root(cfg.run.storage_path), cfg.run.name or new_run_name()))
    # Rank 0 only: under torchrun it creates the folder the other ranks then find (torchrun stops
    # them all when it refuses).
    if not resume and int(os.environ.get("RANK", "0")) == 0 and storage.exists(run_dir):
        name, where = run_dir.rsplit("/", 1)[-1], run_dir.rsplit("/", 1)[0]
        raise UserError(f"run {name} already exists in {where}; pass --resume {name} to continue it, "
                        "or choose another run.name")
    data_dir = storage.resolve_storage(cfg.data.dir)
    check_shards(load_manifest(data_dir), data_dir)  # as a launch on Ray checks them, before anything starts
    from raygpt.training import trackers

    trackers.resolve(cfg)  # the loggers' packages and settings, as a launch on Ray checks them
    if int(os.environ.get("RANK", "0")) == 0:
        trackers.prepare(cfg)
    process_device(cfg.run.use_gpu, int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())  # the same
    print(f"run {run_dir.rsplit('/', 1)[-1]} without Ray -> {run_dir}")
    if int(os.environ.get("RANK", "0")) != 0:
        run_without_ray(cfg, data_dir, run_dir)
        return
    with runs.Lease(run_dir):
        run_without_ray(cfg, data_dir, run_dir)
