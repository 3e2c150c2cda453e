"""What a run says at each report: evaluate, check, log, sample, checkpoint, hand to the runtime.

`Reporter` owns the metrics log rows, the progress marker, the throughput window (steps and
seconds since the last report) and the checkpoint writes, so the loop only says "a step took this
long" and "report now".
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from raygpt import checkpoint as ckpt
from raygpt import runs, storage
from raygpt.config import Config
from raygpt.errors import TrainingFailed
from raygpt.training import perf, recovery, speed
from raygpt.training.choice_evals import ChoiceEvals
from raygpt.training.evaluation import EvalSets, generate_sample
from raygpt.training.runtime import Runtime, TrainState
from raygpt.training.saver import BackgroundSave
from raygpt.training.schedule import lr_at
from raygpt.training.sharding import is_sharded
from raygpt.training.step import StepResult
from raygpt.training.trackers import open_loggers


class Reporter:
    def __init__(self, cfg: Config, rt: Runtime, total_steps: int, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, evals: EvalSets, data_fingerprint: str | None,
                 log_rows: list[dict[str, Any]], elapsed_before: float, choice_evals: ChoiceEvals | None = None):
        self.cfg, self.rt, self.total_steps = cfg, rt, total_steps
        self.model, self.optimizer, self.evals, self.choice_evals = model, optimizer, evals, choice_evals
        self.data_fingerprint, self.log_rows = data_fingerprint, log_rows
        self.rank0 = rt.rank == 0
        self.sharded = is_sharded(model)  # fsdp: every rank writes its shards and runs every forward
        self.async_save = cfg.run.async_save and rt.run_dir is not None
        self.background = BackgroundSave()
        # fsdp's background writes plan over a gloo group of their own (created by every rank here).
        self.save_group = (dist.new_group(backend="gloo") if self.async_save and self.sharded and dist.is_initialized()
                           else None)
        self.progress = recovery.ProgressMarker(rt.run_dir, rt.fit_id) if self.rank0 and rt.run_dir else None
        # run.loggers (TensorBoard, MLflow, W&B): rank 0 feeds each the rows of the metrics log
        self.loggers = open_loggers(cfg, rt, log_rows) if self.rank0 and rt.run_dir else []
        self.last_checkpoint: str | None = None  # the newest checkpoint this process saved (its URI)
        precision = speed.resolve_precision(cfg.train.precision, rt.device)
        self.flops_per_token = perf.model_flops_per_token(cfg.model)
        self.peak = perf.device_peak(rt.device, precision, cfg.run.peak_tflops) if self.rank0 else None
        self.elapsed_before = elapsed_before  # training seconds of the processes before this one
        self.started = time.perf_counter()
        self.window_steps, self.window_seconds = 0, 0.0

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.started)

    def step_done(self, state: TrainState, seconds: float, lr: float, result: StepResult | None) -> None:
        """A step ended; with `result` (every train.log_freq steps), rank 0 logs its light row,
        written to the metrics log with the next report."""
        self.window_steps += 1
        self.window_seconds += seconds
        if self.progress:
            self.progress.step = state.step
        if result is None or not self.rank0 or not self.rt.run_dir:
            return
        tokens = self.cfg.train.batch_size * self.cfg.model.context_len
        row = {"kind": "step", "step": state.step, "epoch": state.epoch, "tokens_seen": state.tokens_seen,
               "train_loss": result.mean_loss, "grad_norm": result.grad_norm_value, "lr": lr,
               "step_time": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0}
        self.log_rows.append(row)
        for logger in self.loggers:
            logger.add(row, flush=False)

    def evaluate_and_log(self, state: TrainState, save: bool, final: bool = False) -> dict[str, Any]:
        """Evaluate (`final`: the larger final sample), log and (if `save`) checkpoint; throughput
        over the steps since the last report. Called on every rank at the same steps."""
        t, o, m = self.cfg.train, self.cfg.optim, self.cfg.model
        steps, seconds = self.window_steps, self.window_seconds
        self.window_steps, self.window_seconds = 0, 0.0
        tokens_per_s = steps * t.batch_size * m.context_len / seconds if seconds > 0 else 0.0
        metrics = {
            "step": state.step, "epoch": state.epoch,
            **self.evals.evaluate(plain_model(self.model), final, initial=state.step == 0),
            **(self.choice_evals.evaluate(plain_model(self.model), state.step, final) if self.choice_evals else {}),
            "lr": lr_at(max(state.step - 1, 0), self.total_steps, o),
            "tokens_seen": state.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.rt.world_size,
            "step_time": seconds / steps if steps else 0.0,
            "mfu": perf.mfu(tokens_per_s / self.rt.world_size, self.flops_per_token, self.peak) if steps else None,
            **perf.peak_memory(self.rt.device),
            "elapsed": self.elapsed(),
            "wall_time": time.time(),  # when: start-up time is the step-0 row's minus the launch
            "total_steps": self.total_steps,
        }
        # The losses are all-reduced, so every rank stops here together, before this state is
        # sampled or saved.
        for split in ("train", "val"):
            if not math.isfinite(metrics[f"{split}_loss"]):
                raise TrainingFailed(f"non-finite {split} loss ({metrics[f'{split}_loss']}) at step {state.step}: "
                                     f"the weights overflowed and were not saved: lower optim.peak_lr")
        if self.progress:
            self.progress.flush()
        if self.rank0 or self.sharded:  # a sharded model's forwards are collectives: every rank samples
            sample = generate_sample(plain_model(self.model), t.start_context, self.rt.device, t.seed)
        if self.rank0:
            self.rt.log(progress_line(metrics))
            self.rt.log(f"  sample: {sample!r}")
            if self.rt.run_dir:
                self.log_rows.append({**metrics, "sample": sample})
                runs.write_log(self.rt.run_dir, self.log_rows)
                for logger in self.loggers:
                    logger.add(metrics)
        with contextlib.ExitStack() as stack:
            folder = name = None
            if save and self.async_save:
                name = self._save_in_background(state, metrics)
            elif save and self.sharded:
                name = self._checkpoint_name(state.step)
                folder = self._save_shards(stack, name, self.checkpoint_state(state, metrics["elapsed"],
                                                                               metrics["val_loss"]))
            elif save and self.rank0:
                folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="raygpt-ckpt-"))
                name = runs.unique_checkpoint_name(self.rt.run_dir, state.step)
                ckpt.save_checkpoint(folder, self.model, self.optimizer,
                                     self.checkpoint_state(state, metrics["elapsed"], metrics["val_loss"]))
            # the latest train.evals scores in every report: a search may rank on them at any report
            self.rt.report({**(self.choice_evals.latest if self.choice_evals else {}), **metrics}, folder, name)
        if save and name and self.rt.run_dir:
            self.last_checkpoint = storage.join(self.rt.run_dir, name)
        return metrics

    def checkpoint_state(self, state: TrainState, elapsed: float, val_loss: float | None) -> dict[str, Any]:
        return {**state.checkpoint_fields(self.cfg.train.batch_size), "elapsed": elapsed, "val_loss": val_loss,
                "config": self.cfg.to_dict(), "data_fingerprint": self.data_fingerprint}

    def _checkpoint_name(self, step: int) -> str:
        """The name of this step's checkpoint folder, the same on every rank (rank 0's choice)."""
        choice = [runs.unique_checkpoint_name(self.rt.run_dir, step) if self.rank0 else None]
        if self.rt.world_size > 1 and dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def _save_shards(self, stack: contextlib.ExitStack, name: str, state: dict[str, Any]) -> str | None:
        """fsdp, on every rank together: write this rank's shards and store them in the run folder;
        once every rank has, rank 0 stores the index, and returns a folder holding state.json alone
        for the report to store last (the other ranks return None). A checkpoint is complete, or
        has no state.json."""
        shards = stack.enter_context(tempfile.TemporaryDirectory(prefix="raygpt-shards-"))
        ckpt.save_sharded(shards, plain_model(self.model), self.optimizer)
        store_shards(shards, storage.join(self.rt.run_dir, name), self.rank0)
        if not self.rank0:
            return None
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="raygpt-ckpt-"))
        ckpt.write_state(folder, state)
        return folder

    def _save_in_background(self, state: TrainState, metrics: dict[str, Any]) -> str:
        """run.async_save: wait for the save in flight, copy the state to host memory (fsdp: each
        rank its shards), and leave writing and storing it to a background thread. Returns the
        checkpoint's name."""
        self.background.wait()
        name = self._checkpoint_name(state.step)
        fields = self.checkpoint_state(state, metrics["elapsed"], metrics["val_loss"])
        target, run_dir, keep = storage.join(self.rt.run_dir, name), self.rt.run_dir, self.cfg.run.num_to_keep
        if self.sharded:
            shards = tempfile.mkdtemp(prefix="raygpt-shards-")
            written = ckpt.save_sharded_async(shards, plain_model(self.model), self.optimizer, self.save_group)
            rank0, group = self.rank0, self.save_group

            def work() -> None:
                try:
                    written.result()
                    store_shards(shards, target, rank0, group)
                    if rank0:
                        with tempfile.TemporaryDirectory(prefix="raygpt-ckpt-") as folder:
                            ckpt.write_state(folder, fields)
                            storage.upload_files(folder, target)
                        runs.prune_checkpoints(run_dir, keep)
                finally:
                    shutil.rmtree(shards, ignore_errors=True)
        elif self.rank0:
            copied = ckpt.snapshot(plain_model(self.model), self.optimizer)

            def work() -> None:
                with tempfile.TemporaryDirectory(prefix="raygpt-ckpt-") as folder:
                    ckpt.save_snapshot(folder, copied, fields)
                    storage.upload(folder, target)
                runs.prune_checkpoints(run_dir, keep)
        else:
            return name
        self.background.start(name, work)
        return name

    def finish(self) -> None:
        """The end of the run: the save in flight stored (its error raised), then the loggers told
        the run is complete and where its final checkpoint is."""
        self.background.wait()
        for logger in self.loggers:
            logger.finish(self.last_checkpoint)

    def save_before_exit(self, state: TrainState) -> None:
        """SIGTERM: the checkpoint straight into the run folder, then leave; the restart resumes
        here. ddp: this rank writes it alone (the replicas hold the same model and optimizer
        state); fsdp: every rank stopped at this step (`any_rank`) and writes its shards."""
        name = self._checkpoint_name(state.step) if self.sharded else runs.unique_checkpoint_name(self.rt.run_dir,
                                                                                                   state.step)
        self.background.wait()
        with contextlib.ExitStack() as stack:
            if self.sharded:
                folder = self._save_shards(stack, name, self.checkpoint_state(state, self.elapsed(), None))
            else:
                folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="raygpt-ckpt-"))
                ckpt.save_checkpoint(folder, self.model, self.optimizer,
                                     self.checkpoint_state(state, self.elapsed(), None))
            if self.rt.run_dir and folder:
                storage.upload(folder, storage.join(self.rt.run_dir, name))
        self.rt.log(f"SIGTERM on rank {self.rt.rank}: saved {name} at step {state.step} before exiting")
        raise recovery.Preempted(f"rank {self.rt.rank} stopped by SIGTERM after saving {name}")

    def close(self) -> None:
        if self.background.in_flight():  # the run failed: still let the last save complete
            try:
                self.background.wait()
            except Exception as exc:
                self.rt.log(f"warning: {exc}")
        if self.progress:
            self.progress.close()
        for logger in self.loggers:  # each one closed, whatever another one says
            try:
                logger.close()
            except Exception as exc:
                self.rt.log(f"warning: closing {type(logger).__name__}: {exc}")


def store_shards(shards: str, target: str, rank0: bool, group: Any = None) -> None:
    """Every rank stores its shard files in the checkpoint folder `target`; once all have (a
    barrier over `group`), rank 0 stores the index. state.json, after it, is the caller's."""
    storage.upload_files(shards, target, [n for n in os.listdir(shards) if n != ckpt.SHARDED_INDEX])
    if dist.is_initialized():
        dist.barrier(group=group)
    if rank0:
        storage.upload_files(shards, target, [ckpt.SHARDED_INDEX])


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model without the training wrappers, compile(DDP(model)) or either alone: evaluation and
    samples run on it eagerly (DDP around an evaluation would sync buffers in every forward, and
    ranks evaluate different numbers of batches). An FSDP2 model is its own plain model (its
    shards are its weights)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def progress_line(m: dict[str, Any]) -> str:
    """One line per report, `key value` fields split by ` | ` (the sample goes on its own line)."""
    return (
        f"step {m['step']:>6}/{m['total_steps']} | epoch {m['epoch']} | train {m['train_loss']:.3f} | "
        f"val {m['val_loss']:.3f} | lr {m['lr']:.2e} | "
        + (f"{m['tokens_per_s']:,.0f} tok/s ({m.get('tokens_per_s_per_device', m['tokens_per_s']):,.0f}/device, "
           f"{m.get('step_time', 0) * 1000:.0f} ms/step, MFU {_percent(m.get('mfu'))}) | "
           if m.get("step_time", 1) else "")
        + f"{m['tokens_seen']:,} tokens | {m['elapsed']:.1f} s"
        + (f" | final eval: {m['eval_tokens']:,} val tokens, {m['eval_time']:.1f} s" if m.get("final_eval")
           else f" | eval {m['eval_time']:.1f} s" if "eval_time" in m else "")
        + (f" | mem {_memory(m)}" if _memory(m) else "")
        + "".join(f" | {k[:-len('_acc_norm')]} acc {m[k[:-len('_norm')]]:.4f} acc_norm {m[k]:.4f}"
                  for k in m if k.endswith("_acc_norm"))
    )


def _memory(m: dict[str, Any]) -> str:
    parts = []
    if m.get("gpu_memory_peak_mb") is not None:
        parts.append(f"{m['gpu_memory_peak_mb']:,.0f} MB GPU")
    if m.get("cpu_rss_peak_mb") is not None:
        parts.append(f"{m['cpu_rss_peak_mb']:,.0f} MB RSS")
    return ", ".join(parts)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
