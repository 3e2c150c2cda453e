"""TensorBoard event files for a run, beside its metrics log: `tensorboard --logdir runs/` (or an
experiment folder, to compare a search's trials) shows every run's curves.

Rank 0 writes the same values as `metrics.jsonl`, at each report: the losses, lr, tokens/s, MFU and
peak memory against the step, and the losses also against tokens seen (runs of different batch
sizes compare on one axis). Events go into the run folder itself, so TensorBoard names each curve
after its run. On a storage URI they are written to a local folder and uploaded after each report,
as the metrics log is. The events always mirror the metrics log: a resumed run (whose log is cut
back to its checkpoint's step) writes them anew from that log, so recomputed steps are never drawn
twice, on either axis.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import pyarrow.fs as pafs

from raygpt import storage

EVENTS_PREFIX = "events.out.tfevents."

# metrics.jsonl key -> TensorBoard tag, against the step
STEP_SCALARS = {
    "train_loss": "loss/train", "val_loss": "loss/val", "lr": "optim/lr",
    "tokens_per_s": "throughput/tokens_per_s", "tokens_per_s_per_device": "throughput/tokens_per_s_per_device",
    "mfu": "throughput/mfu", "step_time": "throughput/step_time_s",
    "cpu_rss_peak_mb": "memory/cpu_rss_peak_mb", "gpu_memory_peak_mb": "memory/gpu_memory_peak_mb",
}
# ... and against tokens seen
TOKEN_SCALARS = {"train_loss": "loss_vs_tokens/train", "val_loss": "loss_vs_tokens/val"}
# The light per-step rows (train.log_freq), against the step, in a group of their own
STEP_ROW_SCALARS = {
    "train_loss": "step/train_loss", "grad_norm": "step/grad_norm", "lr": "step/lr",
    "step_time": "step/step_time_s", "tokens_per_s": "step/tokens_per_s",
}


class TensorBoardLog:
    def __init__(self, run_dir: str, history: list[dict[str, Any]] = ()):
        """Events for `run_dir`, starting with the metric rows of `history` (the metrics log so
        far: empty for a new run)."""
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.remote = storage.is_uri(run_dir)
        self.local = tempfile.mkdtemp(prefix="raygpt-tb-") if self.remote else run_dir
        os.makedirs(self.local, exist_ok=True)
        _remove_events(run_dir)  # this run's earlier events: rewritten from the log below
        self.writer = SummaryWriter(log_dir=self.local)
        for row in history:
            if "event" not in row:
                self._write(row)

    def add(self, metrics: dict[str, Any], flush: bool = True) -> None:
        """One row of the metrics log; `flush` (reports) writes the events out (and uploads them)."""
        self._write(metrics)
        if flush:
            self.writer.flush()
            if self.remote:
                self._upload()

    def _write(self, metrics: dict[str, Any]) -> None:
        step, tokens = metrics["step"], metrics.get("tokens_seen", 0)
        if metrics.get("kind") == "step":
            for key, tag in STEP_ROW_SCALARS.items():
                if metrics.get(key) is not None:
                    self.writer.add_scalar(tag, metrics[key], step)
            return
        for key, tag in STEP_SCALARS.items():
            if metrics.get(key) is not None:
                self.writer.add_scalar(tag, metrics[key], step)
        for key, tag in TOKEN_SCALARS.items():
            if metrics.get(key) is not None:
                self.writer.add_scalar(tag, metrics[key], tokens)
        for key in metrics:  # train.evals scores, where measured
            if key.endswith(("_acc", "_acc_norm")) and metrics[key] is not None:
                self.writer.add_scalar(f"evals/{key}", metrics[key], step)

    def _upload(self) -> None:
        for name in os.listdir(self.local):
            with open(os.path.join(self.local, name), "rb") as f:
                storage.write_bytes(storage.join(self.run_dir, name), f.read())

    def finish(self, checkpoint: str | None) -> None:
        """The run is complete (TensorBoard has nowhere to note its final checkpoint)."""

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            self._upload()
            shutil.rmtree(self.local, ignore_errors=True)


def _remove_events(run_dir: str) -> None:
    fs, path = storage.filesystem(run_dir)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.base_name.startswith(EVENTS_PREFIX):
            fs.delete_file(info.path)
