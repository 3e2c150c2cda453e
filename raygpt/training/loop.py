"""The training loop: plain PyTorch, the training loop of docs/recipe.md made distributed.

It runs the same under Ray Train (`raygpt.training.ray_train`), under torchrun or alone in one
process (`raygpt.training.local`), or in a Tune trial (`raygpt.search.tune`); what differs is the
`Runtime` the caller hands in (rank, device, how to wrap the model and loader, how to report).
`train_loop` reads top to bottom: build -> restore -> for each epoch: for each batch: step
(`raygpt.training.step`), report and save (`raygpt.training.reporter`, which evaluates with
`raygpt.training.evaluation`) -> the last metrics.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from raygpt import checkpoint as ckpt
from raygpt import runs, storage
from raygpt.config import Config, OptimConfig
from raygpt.data.remote import local_shards
from raygpt.data.sampler import GlobalBatchSampler
from raygpt.data.shards import load_manifest
from raygpt.data.windows import WindowDataset
from raygpt.model import GPTModel, fit_rows, mup_lr_scale
from raygpt.training import recovery, speed
from raygpt.training.choice_evals import ChoiceEvals
from raygpt.training.evaluation import EvalSets
from raygpt.training.memory import check_device_memory
from raygpt.training.plan import plan_for
from raygpt.training.reporter import Reporter
from raygpt.training.runtime import Runtime, TrainState
from raygpt.training.schedule import lr_at, should_clip
from raygpt.training.sharding import any_rank, is_sharded, load_whole_state, shard_model
from raygpt.training.step import DevicePrefetcher, step_seed, train_step


def wrap_for_training(model: torch.nn.Module, rt: Runtime, compile_model: bool) -> torch.nn.Module:
    """DDP (or whatever the runtime wraps with), then torch.compile around it: compiled DDP
    (DDPOptimizer) splits the graph at bucket boundaries so each all-reduce overlaps the rest of
    backward; DDP around a compiled model would fire every bucket at the end of backward."""
    return speed.maybe_compile(rt.wrap_model(model), compile_model)


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW; by default every parameter decays (the recipe); `decay_matrices_only` spares biases,
    LayerNorm and embeddings. Under µP the hidden matrices get groups of their own whose
    `lr_scale` (1 / width_mult) `train_step` applies to the scheduled lr."""
    if optim.decay_matrices_only:
        no_decay = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in no_decay]
        rest = [p for p in model.parameters() if p.dim() < 2 or id(p) in no_decay]
        groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": optim.weight_decay}]
    scale = mup_lr_scale(model)
    if scale:  # split each group: its µP hidden matrices, and the rest at the base lr
        groups = [g for group in groups for g in (
            {**group, "params": [p for p in group["params"] if id(p) not in scale]},
            {**group, "params": [p for p in group["params"] if id(p) in scale],
             "lr_scale": next(iter(scale.values()))}) if g["params"]]
    device = next(model.parameters()).device
    return speed.adamw(groups, optim.peak_lr, tuple(optim.betas), optim.eps, speed.fused_adamw(optim.fused, device))


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
            found = ckpt.load_newest_valid(candidates, rt.log)
            choice = [found[1] if found else None]
        dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return None
        if rt.rank == 0:
            return found
        with storage.temporary_dir() as tmp:
            return ckpt.load_checkpoint(storage.download(choice[0], tmp)), choice[0]
    return ckpt.load_newest_valid(candidates, rt.log)


def train_loop(cfg: Config, data_dir: str, rt: Runtime) -> dict[str, Any]:
    """Build -> restore -> for each epoch: for each batch: step, report, save -> the last metrics."""
    t, o, m = cfg.train, cfg.optim, cfg.model
    rank0 = rt.rank == 0
    # Every launcher (Ray worker, torchrun rank, Tune trial) runs this many threads; the same count
    # on resume is part of what makes a resumed run bitwise equal to an uninterrupted one.
    torch.set_num_threads(max(1, int(cfg.run.cpus_per_worker)))
    # Shards on a storage URI are copied to this node's disk once, then memory-mapped (and the
    # manifest is read from that copy, not fetched again).
    data_dir = local_shards(data_dir, log=rt.log if rank0 else lambda line: None)
    manifest = load_manifest(data_dir)
    plan = plan_for(cfg, data_dir, manifest)
    precision = speed.resolve_precision(t.precision, rt.device)
    speed.set_tf32(rt.device, t.tf32)

    # Each worker's GPU, before anything is put on it: refused in one line past its free memory.
    check_device_memory(cfg, rt.device, rt.log if rank0 else lambda line: None)
    torch.manual_seed(t.seed)
    model = GPTModel.from_config(m).to(rt.device)  # on its device first: a fused optimizer needs that
    sharded = cfg.run.strategy == "fsdp"
    if sharded:  # before the optimizer: it steps the shards
        model = shard_model(model, bf16=precision == "bf16")
    optimizer = build_optimizer(model, o)
    if rank0 and cfg.fault.crash_at_step is not None:
        rt.log(recovery.describe_fault(cfg.fault))
    state, log_rows = _restore_into(model, optimizer, cfg, manifest, rt)
    model = speed.maybe_compile(model, t.compile) if sharded else wrap_for_training(model, rt, t.compile)

    train_ds = WindowDataset(data_dir, "train", m.context_len, cfg.data.stride or m.context_len)
    sampler = GlobalBatchSampler(train_ds, t.batch_size, rt.rank, rt.world_size, t.seed)
    loader = rt.wrap_loader(DataLoader(train_ds, batch_size=plan.micro_batch, sampler=sampler, drop_last=True,
                                       pin_memory=rt.device.type == "cuda"))
    # Evaluation reads the train split's windows and the val split's non-overlapping windows.
    evals = EvalSets(cfg, train_ds, WindowDataset(data_dir, "val", m.context_len, m.context_len), plan.micro_batch, rt)
    choice_evals = ChoiceEvals(cfg, rt, plan.micro_batch, log_rows)  # train.evals: HellaSwag and the like
    reporter = Reporter(cfg, rt, plan.total_steps, model, optimizer, evals, manifest.get("fingerprint"), log_rows,
                        state.elapsed, choice_evals)
    tokens_per_step = t.batch_size * m.context_len  # every worker consumes an equal share
    stop = recovery.StopRequest()
    metrics: dict[str, Any] = {}
    try:
        if state.step == 0:
            metrics = reporter.evaluate_and_log(state, save=False)  # the untrained model: where the curves start
        model.train()
        while state.step < plan.total_steps:  # one pass per epoch; a resumed one from its batch
            sampler.set_position(state.epoch, state.batch_in_epoch)
            batches = DevicePrefetcher(iter(loader), rt.device)
            for _ in range(min(plan.steps_per_epoch - state.batch_in_epoch, plan.total_steps - state.step)):
                t0 = time.perf_counter()
                lr = lr_at(state.step, plan.total_steps, o)
                log_step = (state.step + 1) % t.log_freq == 0  # every rank alike: the loss mean is a collective
                clip = o.max_norm if should_clip(state.step, o.warmup_steps, o.clip_during_warmup) else None
                result = train_step(model, optimizer, batches, lr=lr,
                                    seed=step_seed(t.seed, state.epoch, state.step, rt.rank), max_norm=clip,
                                    grad_accum_steps=t.grad_accum_steps, device=rt.device, precision=precision,
                                    step_label=f"step {state.step + 1} on rank {rt.rank}", mean_loss=log_step)
                state.advance(tokens_per_step, plan.steps_per_epoch)
                reporter.step_done(state, time.perf_counter() - t0, lr, result if log_step else None)
                # fsdp: a checkpoint is written by every rank together, so every rank stops at the
                # step where any rank saw SIGTERM (one small all-reduce per step).
                if any_rank(stop.requested(), rt.device) if sharded else stop.requested():
                    reporter.save_before_exit(state)
                done = state.step >= plan.total_steps
                save = state.step % t.save_freq == 0 or done or state.step in rt.extra_save_steps
                if save or state.step % t.eval_freq == 0:
                    metrics = reporter.evaluate_and_log(state, save, final=done)
                recovery.maybe_inject_fault(cfg.fault, state.step, rt.rank, rt.run_dir, rt.log)
        reporter.finish()  # run.async_save: the last checkpoint stored before the run counts as done
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

            if is_sharded(model):
                whole = GPTModel.from_config(cfg.model)
                hf.load_into(whole, cfg.model.init_from)
                load_whole_state(model, None, {"model": whole.state_dict()})
            else:
                hf.load_into(model, cfg.model.init_from)
            if rt.rank == 0:
                rt.log(f"initialised from {cfg.model.init_from}")
        return TrainState(), []
    loaded, uri = restored
    ckpt.check_resumable(loaded["state"], uri)
    ckpt.check_same_shape(loaded["state"]["config"]["model"], cfg.model, uri)
    ckpt.check_same_data(loaded["state"], manifest.get("fingerprint"), uri)
    if loaded["sharded"] or is_sharded(model):  # either layout into either strategy, resharded
        load_whole_state(model, optimizer, loaded)
    else:
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        _fit_optimizer_rows(optimizer)
    s = loaded["state"]
    state = TrainState(s["step"], s["epoch"], s["batch_in_epoch"], s["tokens_seen"], s["elapsed"])
    log_rows: list[dict[str, Any]] = []
    if rt.rank == 0:
        event = recovery.restart_event(rt.run_dir, rt.fit_id, state.step, uri)
        rt.log(recovery.describe_event(event))
        log_rows = [r for r in runs.read_log(rt.run_dir) if "event" in r or r["step"] <= state.step] + [event]
    return state, log_rows


