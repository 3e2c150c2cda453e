"""The training loop: plain PyTorch, the recipe's `hyper_pretrain_model` made distributed.

It runs the same under Ray Train (raygpt.train), under torchrun, or alone in one process; what
differs is the `Runtime` the caller hands in (rank, device, how to wrap the model and loader,
how to report). Per optimizer step: lr from the step, forward, cross-entropy, backward (with
`no_sync` on inner accumulation micro-steps), clipping after warmup, AdamW step. Every eval_freq
steps: train and val loss over fixed windows spread across each whole split (`spread_windows`),
shared among the workers; the last report reads a larger sample.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from raygpt import checkpoint as ckpt
from raygpt import storage
from raygpt import fastpath, perf, recovery, runs
from raygpt.config import Config, OptimConfig, TrainConfig
from raygpt.data import WindowDataset, check_data_for_model, load_manifest, num_windows
from raygpt.errors import TrainingFailed, UserError
from raygpt.model import GPTModel, fit_rows
from raygpt.shared_data import local_shards
from raygpt.sampler import GlobalBatchSampler
from raygpt.schedule import clip_gradients, gradient_norm, should_clip, warmup_cosine_lr
from raygpt.tokenizer import EOT_ID, gpt2_encoding



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


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Randomness of one step on one rank (dropout), from (seed, epoch, step, rank) alone, so a
    resumed run draws exactly what an uninterrupted one would."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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

    def checkpoint_fields(self, batch_size: int) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "samples_consumed": self.step * batch_size, "tokens_seen": self.tokens_seen,
                # The metrics log is cut back to this step when a run restores this checkpoint.
                "metrics_log_through_step": self.step}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model without DDP around it (still compiled, if it was)."""
    return model.module if hasattr(model, "module") else model


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The model without DDP and without torch.compile (generation's growing lengths would
    recompile it at every token)."""
    return getattr(_unwrap(model), "_orig_mod", _unwrap(model))


def _fit_optimizer_rows(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state restored from a run with another vocabulary padding: fit its rows too."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != p.shape and value.shape[1:] == p.shape[1:]:
                    optimizer.state[p][key] = fit_rows(value, p.shape[0])


# ----------------------------------------------------------------------------- evaluation


def spread_windows(n_windows: int, count: int) -> list[int]:
    """`count` window indices spread evenly over a split of `n_windows` windows (all of them when
    count >= n_windows): sorted, distinct, gaps differing by at most one, the first and the last
    window included (count >= 2; one window is the first). Pure: the same at every eval, on every
    rank and on any worker count."""
    count = max(0, min(count, n_windows))
    if count <= 1:
        return [0] * count
    return [i * (n_windows - 1) // (count - 1) for i in range(count)]


def eval_window_count(tokens: int | None, context_len: int, n_windows: int) -> int:
    """Windows of an eval of `tokens` tokens: ceil(tokens / context_len), at most the split's
    `n_windows` (None: the whole split)."""
    return n_windows if tokens is None else min(n_windows, -(-tokens // context_len))


def _sum_over_workers(values: list[float], rt: Runtime) -> list[float]:
    """Element-wise sum over the workers, in float64 (the values themselves on one worker)."""
    if rt.world_size == 1 or not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: WindowDataset, windows: list[int], batch: int, rt: Runtime,
             precision: str = "fp32") -> tuple[float, int]:
    """(mean cross-entropy over the windows `windows` of `ds`, how many windows), shared among the
    workers: this rank scores windows[rank::world_size], `batch` windows per forward pass, and the
    per-window loss sums and counts are all-reduced in float64, so the mean over the same windows
    is the same on any worker count up to float rounding. Draws no random number (no DataLoader)."""
    model.eval()
    mine = windows[rt.rank::rt.world_size]
    total = torch.zeros((), dtype=torch.float64, device=rt.device)
    for start in range(0, len(mine), batch):
        xs, ys = zip(*(ds[i] for i in mine[start:start + batch]))
        x = torch.stack(xs).to(rt.device, non_blocking=True)
        y = torch.stack(ys).to(rt.device, non_blocking=True)
        with fastpath.autocast(rt.device, precision):
            losses = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
        total += losses.float().view(len(xs), -1).mean(dim=1).double().sum()
    model.train()
    loss_sum, count = _sum_over_workers([total.item(), float(len(mine))], rt)
    return loss_sum / max(count, 1.0), int(count)


@torch.no_grad()
def evaluate_first(model: torch.nn.Module, loader: DataLoader, batches: int, rt: Runtime,
                   precision: str = "fp32") -> tuple[float, int]:
    """`train.eval_mode: first`, the original recipe's eval: the mean cross-entropy of the first
    `batches` batches of `loader` (this rank's share of the split, in order), averaged over the
    workers; and how many windows all workers read."""
    model.eval()
    total, count, windows = 0.0, 0, 0
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        x, y = x.to(rt.device), y.to(rt.device)
        with fastpath.autocast(rt.device, precision):
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        count += 1
        windows += len(x)
    model.train()
    shared = rt.world_size > 1 and dist.is_initialized()
    mean_sum, windows_all = _sum_over_workers([total / max(count, 1), float(windows)], rt)
    return mean_sum / (rt.world_size if shared else 1), int(windows_all)


def generate_sample(model: torch.nn.Module, prompt: str, device: torch.device, seed: int,
                    max_new_tokens: int = 40) -> str:
    """A progress sample: top-k sampling from its own generator (greedy decoding of a young model
    is mostly whitespace), so the training RNG is untouched."""
    enc = gpt2_encoding()
    idx = torch.tensor([enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT_ID]], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens=max_new_tokens, temperature=0.8, top_k=40, eos_id=EOT_ID,
                         generator=generator)
    return enc.decode(out[0].tolist())


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
    t, o, m = cfg.train, cfg.optim, cfg.model
    rank0 = rt.rank == 0
    # Shards on a storage URI are copied to this node's disk once, then memory-mapped (and the
    # manifest is read from that copy, not fetched again).
    data_dir = local_shards(data_dir, log=rt.log if rank0 else lambda line: None)
    manifest = load_manifest(data_dir)
    plan = plan_for(cfg, data_dir, manifest)
    b_local = t.batch_size // rt.world_size

    precision = fastpath.resolve_precision(t.precision, rt.device)
    fastpath.set_tf32(rt.device, t.tf32)
    torch.manual_seed(t.seed)
    model = GPTModel.from_config(m).to(rt.device)  # on its device first: a fused optimizer needs that
    optimizer = build_optimizer(model, o)
    state = TrainState()
    log_rows: list[dict[str, Any]] = []  # the metrics log: metric rows and restart events
    if rank0 and cfg.fault.crash_at_step is not None:
        rt.log(recovery.describe_fault(cfg.fault))
    restored = _restore(rt, cfg)
    if restored is not None:
        loaded, uri = restored
        ckpt.check_same_shape(loaded["state"]["config"]["model"], m, uri)
        ckpt.check_same_data(loaded["state"], manifest.get("fingerprint"), uri)
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        _fit_optimizer_rows(optimizer)
        s = loaded["state"]
        state = TrainState(s["step"], s["epoch"], s["batch_in_epoch"], s["tokens_seen"], s["elapsed"])
        if rank0:
            event = recovery.restart_event(rt.run_dir, rt.fit_id, state.step, uri)
            rt.log(recovery.describe(event))
            log_rows = [r for r in runs.read_log(rt.run_dir) if "event" in r or r["step"] <= state.step] + [event]
    model = rt.wrap_model(fastpath.maybe_compile(model, t.compile))
    progress = recovery.ProgressMarker(rt.run_dir, rt.fit_id) if rank0 and rt.run_dir else None
    stop = recovery.StopRequest()

    stride = cfg.data.stride or m.context_len
    train_ds = WindowDataset(data_dir, "train", m.context_len, stride)
    sampler = GlobalBatchSampler(train_ds, t.batch_size, rt.rank, rt.world_size, t.seed)
    pin = rt.device.type == "cuda"
    loader = rt.wrap_loader(DataLoader(train_ds, batch_size=plan.micro_batch, sampler=sampler, drop_last=True,
                                       pin_memory=pin))
    # Evaluation reads the train split's windows and the val split's non-overlapping windows.
    eval_ds = {"train": train_ds, "val": WindowDataset(data_dir, "val", m.context_len, m.context_len)}
    eval_loaders: dict[str, DataLoader] = {}
    eval_windows: dict[tuple[str, bool], list[int]] = {}
    if t.eval_mode == "first":  # each worker the first eval_iter micro-batches of its share, in order
        for split, ds in eval_ds.items():
            es = DistributedSampler(ds, num_replicas=rt.world_size, rank=rt.rank, shuffle=False)
            eval_loaders[split] = DataLoader(ds, batch_size=plan.micro_batch, sampler=es, pin_memory=pin)
    else:  # fixed windows spread over each whole split; the last report reads more val windows
        final_tokens = None if t.final_eval_tokens is None else max(t.final_eval_tokens, t.eval_tokens)
        for split, final, tokens in (("train", False, t.eval_tokens), ("val", False, t.eval_tokens),
                                     ("val", True, final_tokens)):
            n = len(eval_ds[split])
            eval_windows[split, final] = spread_windows(n, eval_window_count(tokens, m.context_len, n))

    def evaluate_splits(final: bool) -> dict[str, Any]:
        """Train and val loss, the tokens each read, the seconds both took, and whether this was
        the final eval (its larger val sample)."""
        raw, t0, out = _unwrap(model), time.perf_counter(), {}
        for split, ds in eval_ds.items():
            if t.eval_mode == "first":
                out[split] = evaluate_first(raw, eval_loaders[split], t.eval_iter, rt, precision)
            else:
                windows = eval_windows[split, final and split == "val"]
                out[split] = evaluate(raw, ds, windows, plan.micro_batch, rt, precision)
        return {"train_loss": out["train"][0], "val_loss": out["val"][0],
                "eval_tokens": out["val"][1] * m.context_len, "train_eval_tokens": out["train"][1] * m.context_len,
                "eval_time": time.perf_counter() - t0, "final_eval": final and t.eval_mode == "spread"}

    def checkpoint_state(elapsed: float, val_loss: float | None) -> dict[str, Any]:
        return {**state.checkpoint_fields(t.batch_size), "elapsed": elapsed, "val_loss": val_loss,
                "config": cfg.to_dict(), "data_fingerprint": manifest.get("fingerprint")}

    flops_per_token = perf.model_flops_per_token(m)
    peak = perf.device_peak(rt.device, precision, cfg.run.peak_tflops) if rank0 else None

    def report(steps: int, step_seconds: float, save: bool, final: bool = False) -> dict[str, Any]:
        """Evaluate (`final`: the larger final sample), log and (if `save`) checkpoint; throughput
        over the `steps` since the last report."""
        tokens_per_s = steps * t.batch_size * m.context_len / step_seconds if step_seconds > 0 else 0.0
        metrics = {
            "step": state.step, "epoch": state.epoch,
            **evaluate_splits(final),
            "lr": warmup_cosine_lr(max(state.step - 1, 0), plan.total_steps, o.warmup_steps, o.initial_lr,
                                   o.peak_lr, o.min_lr),
            "tokens_seen": state.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / rt.world_size,
            "step_time": step_seconds / steps if steps else 0.0,
            "mfu": perf.mfu(tokens_per_s / rt.world_size, flops_per_token, peak) if steps else None,
            "elapsed": state.elapsed + (time.perf_counter() - started),
            "wall_time": time.time(),  # when: start-up time is the step-0 row's minus the launch
            "total_steps": plan.total_steps,
        }
        # All-reduced, so every rank stops here together, before this state is sampled or saved.
        for split in ("train", "val"):
            if not math.isfinite(metrics[f"{split}_loss"]):
                raise TrainingFailed(f"non-finite {split} loss ({metrics[f'{split}_loss']}) at step {state.step}: "
                                     f"the weights overflowed and were not saved: lower optim.peak_lr")
        if progress:
            progress.flush()
        if rank0:
            sample = generate_sample(_plain(model), t.start_context, rt.device, t.seed)
            rt.log(progress_line(metrics) + f"\n  sample: {sample!r}")
            if rt.run_dir:
                log_rows.append({**metrics, "sample": sample})
                runs.write_log(rt.run_dir, log_rows)
        with contextlib.ExitStack() as stack:
            folder = name = None
            if save and rank0:
                folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="raygpt-ckpt-"))
                name = runs.unique_checkpoint_name(rt.run_dir, state.step)
                ckpt.save_checkpoint(folder, model, optimizer, checkpoint_state(metrics["elapsed"], metrics["val_loss"]))
            rt.report(metrics, folder, name)
        return metrics

    def save_before_exit() -> None:
        """SIGTERM: this rank writes the checkpoint itself (DDP replicas hold the same model and
        optimizer state), straight into the run folder, then leaves; the restart resumes here."""
        name = runs.unique_checkpoint_name(rt.run_dir, state.step)
        with tempfile.TemporaryDirectory(prefix="raygpt-ckpt-") as folder:
            ckpt.save_checkpoint(folder, model, optimizer,
                                 checkpoint_state(state.elapsed + time.perf_counter() - started, None))
            if rt.run_dir:
                storage.upload(folder, storage.join(rt.run_dir, name))
        rt.log(f"SIGTERM on rank {rt.rank}: saved {name} at step {state.step} before exiting")
        raise recovery.Preempted(f"rank {rt.rank} stopped by SIGTERM after saving {name}")

    started = time.perf_counter()
    metrics: dict[str, Any] = {}
    try:
        if state.step == 0:
            metrics = report(0, 0.0, save=False)  # the untrained model: where the curves start
        window_steps, window_seconds = 0, 0.0
        model.train()
        while state.step < plan.total_steps:
            sampler.set_position(state.epoch, state.batch_in_epoch)
            batches = iter(loader)
            while True:
                t0 = time.perf_counter()
                lr = warmup_cosine_lr(state.step, plan.total_steps, o.warmup_steps, o.initial_lr, o.peak_lr,
                                      o.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                torch.manual_seed(step_seed(t.seed, state.epoch, state.step, rt.rank))
                for micro in range(t.grad_accum_steps):
                    x, y = next(batches)
                    x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                    last = micro == t.grad_accum_steps - 1
                    sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                    with sync:
                        with fastpath.autocast(rt.device, precision):
                            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                        (loss / t.grad_accum_steps).backward()
                clip = should_clip(state.step, o.warmup_steps, o.clip_during_warmup)
                grad_norm = clip_gradients(model.parameters(), o.max_norm) if clip else gradient_norm(model.parameters())
                # The gradients are all-reduced, so every rank sees the same norm and stops together,
                # before the step: the weights (and every checkpoint) stay as they were.
                if not math.isfinite(grad_norm.item()):
                    raise TrainingFailed(f"non-finite gradient norm ({grad_norm.item()}) at step {state.step + 1} "
                                         f"(loss {loss.item():.4g} on rank {rt.rank}); nothing of this step was "
                                         f"applied or saved: lower optim.peak_lr, or check the data")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batch_in_epoch += 1
                # Every worker consumed b_local sequences (equal shares by construction): the sum.
                state.tokens_seen += b_local * m.context_len * rt.world_size
                window_seconds += time.perf_counter() - t0
                window_steps += 1
                epoch_done = state.batch_in_epoch >= plan.steps_per_epoch
                if epoch_done:  # roll over now, so a checkpoint here says "next epoch, batch 0"
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                if progress:
                    progress.step = state.step
                if stop.requested():
                    save_before_exit()
                done = state.step >= plan.total_steps
                save = state.step % t.save_freq == 0 or done or state.step in rt.extra_save_steps
                if save or state.step % t.eval_freq == 0:
                    metrics = report(window_steps, window_seconds, save, final=done)
                    window_steps, window_seconds = 0, 0.0
                recovery.maybe_inject_fault(cfg.fault, state.step, rt.rank, rt.run_dir, rt.log)
                if epoch_done or done:
                    break
    finally:
        stop.close()
        if progress:
            progress.close()
    return metrics


def progress_line(m: dict[str, Any]) -> str:
    return (
        f"step {m['step']:>6}/{m['total_steps']} | epoch {m['epoch']} | train {m['train_loss']:.3f} | "
        f"val {m['val_loss']:.3f} | lr {m['lr']:.2e} | "
        + (f"{m['tokens_per_s']:,.0f} tok/s ({m.get('tokens_per_s_per_device', m['tokens_per_s']):,.0f}/device, "
           f"{m.get('step_time', 0) * 1000:.0f} ms/step, MFU {_percent(m.get('mfu'))}) | "
           if m.get("step_time", 1) else "")
        + f"{m['tokens_seen']:,} tokens | {m['elapsed']:.1f} s"
        + (f" | final eval: {m['eval_tokens']:,} val tokens, {m['eval_time']:.1f} s" if m.get("final_eval")
           else f" | eval {m['eval_time']:.1f} s" if "eval_time" in m else "")
    )


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


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
