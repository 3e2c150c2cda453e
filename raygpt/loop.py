"""The training loop: plain PyTorch, the recipe's `hyper_pretrain_model` made distributed.

It runs the same under Ray Train (raygpt.train), under torchrun, or alone in one process; what
differs is the `Runtime` the caller hands in (rank, device, how to wrap the model and loader,
how to report). Per optimizer step: lr from the step, forward, cross-entropy, backward (with
`no_sync` on inner accumulation micro-steps), clipping after warmup, AdamW step. Every eval_freq
steps: train and val loss over fixed windows spread across each whole split (`spread_windows`),
shared among the workers; the last report reads a larger sample.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from raygpt import checkpoint as ckpt
from raygpt import fastpath, recovery, runs, storage
from raygpt.config import Config, OptimConfig, TrainConfig
from raygpt.data import WindowDataset, check_data_for_model, load_manifest, num_windows
from raygpt.errors import UserError
from raygpt.evaluation import EvalSets
from raygpt.model import GPTModel, fit_rows
from raygpt.reporter import Reporter
from raygpt.sampler import GlobalBatchSampler
from raygpt.schedule import should_clip, warmup_cosine_lr
from raygpt.shared_data import local_shards
from raygpt.step import step_seed, train_step

# ----------------------------------------------------------------------------- planning (pure)


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


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW; by default every parameter decays (the recipe); `decay_matrices_only` spares biases,
    LayerNorm and embeddings."""
    if optim.decay_matrices_only:
        no_decay = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in no_decay]
        rest = [p for p in model.parameters() if p.dim() < 2 or id(p) in no_decay]
        groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": optim.weight_decay}]
    device = next(model.parameters()).device
    return fastpath.adamw(groups, optim.peak_lr, tuple(optim.betas), optim.eps, fastpath.fused_adamw(optim.fused, device))


# ----------------------------------------------------------------------------- runtime


def save_to_run_dir(run_dir: str, keep: int | None = None) -> Callable[[dict[str, Any], str | None, str | None], None]:
    """The report of a run without Ray Train: copy each checkpoint into the run folder, and with
    `keep`, keep only that many (best by val_loss) plus the newest, as Ray Train would."""

    def report(metrics: dict[str, Any], folder: str | None, name: str | None) -> None:
        if folder is not None and name is not None:
            storage.upload(folder, storage.join(run_dir, name))
            if keep is not None:
                runs.prune_checkpoints(run_dir, keep)

    return report


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
    # Called on every rank at the same points (Ray's report is a barrier); the checkpoint folder
    # and its name are given on rank 0 only, and the folder is deleted once report returns.
    report: Callable[[dict[str, Any], str | None, str | None], None] = lambda metrics, folder, name: None
    log: Callable[[str], None] = print
    # Steps that also save a checkpoint (besides every save_freq and the end): a search saves
    # where early stopping may stop a trial, so a stopped trial keeps where it stopped.
    extra_save_steps: frozenset[int] = frozenset()


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


def _fit_optimizer_rows(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state restored from a run with another vocabulary padding: fit its rows too."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != p.shape and value.shape[1:] == p.shape[1:]:
                    optimizer.state[p][key] = fit_rows(value, p.shape[0])


def _restore(rt: Runtime, cfg: Config) -> tuple[dict[str, Any], str] | None:
    """Every rank loads the checkpoint rank 0 found to be the newest valid one in the run folder."""
    if rt.run_dir is None:
        return None
    candidates = list(reversed(runs.list_checkpoints(rt.run_dir)))  # newest first
    if rt.world_size > 1 and dist.is_initialized():
        # One choice for all ranks: rank 0 validates, the others load what it chose.
        choice: list[Any] = [None]
        if rt.rank == 0:
            found = recovery.load_newest_valid(candidates, rt.log)
            choice = [found[1] if found else None]
        dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return None
        if rt.rank == 0:
            return found
        with storage.temporary_dir() as tmp:
            return ckpt.load_checkpoint(storage.download(choice[0], tmp)), choice[0]
    return recovery.load_newest_valid(candidates, rt.log)


# ----------------------------------------------------------------------------- the loop


def train_loop(cfg: Config, data_dir: str, rt: Runtime) -> dict[str, Any]:
    """Build -> restore -> for each epoch: for each batch: step, report, save -> the last metrics."""
    t, o, m = cfg.train, cfg.optim, cfg.model
    rank0 = rt.rank == 0
    # Shards on a storage URI are copied to this node's disk once, then memory-mapped (and the
    # manifest is read from that copy, not fetched again).
    data_dir = local_shards(data_dir, log=rt.log if rank0 else lambda line: None)
    manifest = load_manifest(data_dir)
    plan = plan_for(cfg, data_dir, manifest)
    precision = fastpath.resolve_precision(t.precision, rt.device)
    fastpath.set_tf32(rt.device, t.tf32)

    torch.manual_seed(t.seed)
    model = GPTModel.from_config(m).to(rt.device)  # on its device first: a fused optimizer needs that
    optimizer = build_optimizer(model, o)
    if rank0 and cfg.fault.crash_at_step is not None:
        rt.log(recovery.describe_fault(cfg.fault))
    state, log_rows = _restore_into(model, optimizer, cfg, manifest, rt)
    model = rt.wrap_model(fastpath.maybe_compile(model, t.compile))

    train_ds = WindowDataset(data_dir, "train", m.context_len, cfg.data.stride or m.context_len)
    sampler = GlobalBatchSampler(train_ds, t.batch_size, rt.rank, rt.world_size, t.seed)
    loader = rt.wrap_loader(DataLoader(train_ds, batch_size=plan.micro_batch, sampler=sampler, drop_last=True,
                                       pin_memory=rt.device.type == "cuda"))
    # Evaluation reads the train split's windows and the val split's non-overlapping windows.
    evals = EvalSets(cfg, train_ds, WindowDataset(data_dir, "val", m.context_len, m.context_len), plan.micro_batch, rt)
    reporter = Reporter(cfg, rt, plan.total_steps, model, optimizer, evals, manifest.get("fingerprint"), log_rows,
                        state.elapsed)
    tokens_per_step = t.batch_size * m.context_len  # every worker consumes an equal share
    stop = recovery.StopRequest()
    metrics: dict[str, Any] = {}
    try:
        if state.step == 0:
            metrics = reporter.report(state, save=False)  # the untrained model: where the curves start
        model.train()
        while state.step < plan.total_steps:  # one pass per epoch; a resumed one from its batch
            sampler.set_position(state.epoch, state.batch_in_epoch)
            batches = iter(loader)
            for _ in range(min(plan.steps_per_epoch - state.batch_in_epoch, plan.total_steps - state.step)):
                t0 = time.perf_counter()
                train_step(model, optimizer, batches,
                           lr=warmup_cosine_lr(state.step, plan.total_steps, o.warmup_steps, o.initial_lr,
                                               o.peak_lr, o.min_lr),
                           seed=step_seed(t.seed, state.epoch, state.step, rt.rank),
                           max_norm=o.max_norm if should_clip(state.step, o.warmup_steps, o.clip_during_warmup) else None,
                           grad_accum_steps=t.grad_accum_steps, device=rt.device, precision=precision,
                           step_label=f"step {state.step + 1} on rank {rt.rank}")
                state.advance(tokens_per_step, plan.steps_per_epoch)
                reporter.step_done(state.step, time.perf_counter() - t0)
                if stop.requested():
                    reporter.save_before_exit(state)
                done = state.step >= plan.total_steps
                save = state.step % t.save_freq == 0 or done or state.step in rt.extra_save_steps
                if save or state.step % t.eval_freq == 0:
                    metrics = reporter.report(state, save, final=done)
                recovery.maybe_inject_fault(cfg.fault, state.step, rt.rank, rt.run_dir, rt.log)
    finally:
        stop.close()
        reporter.close()
    return metrics


def _restore_into(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config,
                  manifest: dict[str, Any], rt: Runtime) -> tuple[TrainState, list[dict[str, Any]]]:
    """Load the newest valid checkpoint of the run folder, if any, into the model and optimizer:
    the state to continue from and the metrics log rows up to it (plus the restart event)."""
    restored = _restore(rt, cfg)
    if restored is None:
        if cfg.model.init_from:  # a new run from Hugging Face weights (every rank reads the same file)
            from raygpt import hf

            hf.load_into(model, cfg.model.init_from)
            if rt.rank == 0:
                rt.log(f"initialised from {cfg.model.init_from}")
        return TrainState(), []
    loaded, uri = restored
    ckpt.check_same_shape(loaded["state"]["config"]["model"], cfg.model, uri)
    ckpt.check_same_data(loaded["state"], manifest.get("fingerprint"), uri)
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    _fit_optimizer_rows(optimizer)
    s = loaded["state"]
    state = TrainState(s["step"], s["epoch"], s["batch_in_epoch"], s["tokens_seen"], s["elapsed"])
    log_rows: list[dict[str, Any]] = []
    if rt.rank == 0:
        event = recovery.restart_event(rt.run_dir, rt.fit_id, state.step, uri)
        rt.log(recovery.describe(event))
        log_rows = [r for r in runs.read_log(rt.run_dir) if "event" in r or r["step"] <= state.step] + [event]
    return state, log_rows


def run_without_ray(cfg: Config, data_dir: str, run_dir: str) -> dict[str, Any]:
    """The same loop with no Ray: one process, or DDP under `torchrun` (gloo on CPU, NCCL on GPU).
    A run folder that already holds checkpoints is resumed from the newest valid one."""
    import os
    import uuid

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = cfg.run.use_gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")

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
        if world > 1:
            dist.destroy_process_group()
