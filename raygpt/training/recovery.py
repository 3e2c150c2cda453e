"""Crash safety around the loop: saving a checkpoint on SIGTERM,
saying when a restart happened, and injecting faults to watch all of it work.

Randomness needs no saved state: the loop reseeds every step from (seed, epoch, step, rank), and
the data position is (epoch, global batches consumed). So any complete checkpoint, from any rank,
resumes a run exactly, on any number of workers.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import threading
import time
from typing import Any, Callable

from raygpt import runs, storage


class InjectedFault(RuntimeError):
    """The failure `fault.kind: raise` injects."""


class Preempted(RuntimeError):
    """Raised after the checkpoint a SIGTERM asked for is saved: this worker is going away."""


# ----------------------------------------------------------------------------- restart reports


class ProgressMarker:
    """Rank 0 keeps `<run>/progress.json` ({"fit_id", "step"}) current within a second, from a
    background thread (no storage write on the training path), and exactly at each report, so a
    restart can say how far the run had got and how many steps it recomputes (a hard kill
    between reports may leave it up to a second behind)."""

    def __init__(self, run_dir: str, fit_id: str, interval_s: float = 1.0):
        self.uri = storage.join(run_dir, runs.PROGRESS_FILE)
        self.fit_id, self.interval_s = fit_id, interval_s
        self.step, self._written = -1, -1
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="raygpt-progress", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        step = self.step
        if step != self._written:
            storage.write_text(self.uri, json.dumps({"fit_id": self.fit_id, "step": step}))
            self._written = step

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except OSError:
                pass  # storage hiccup: the next tick tries again

    def flush(self) -> None:
        with self._lock:
            self._write()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()


def restart_event(run_dir: str | None, fit_id: str, restored_step: int, checkpoint_uri: str) -> dict[str, Any]:
    """What the metrics log and the progress output say about a restore: a `restart` (Ray
    restarted the workers within this fit) or a `resume` (a new fit of an existing run)."""
    progress: dict[str, Any] = {}
    if run_dir and storage.exists(storage.join(run_dir, runs.PROGRESS_FILE)):
        progress = json.loads(storage.read_text(storage.join(run_dir, runs.PROGRESS_FILE)))
    reached = max(int(progress.get("step", restored_step)), restored_step)
    return {
        "event": "restart" if progress.get("fit_id") == fit_id else "resume",
        "from_checkpoint": checkpoint_uri.rstrip("/").rsplit("/", 1)[-1],
        "restored_step": restored_step,
        "reached_step": reached,
        "recomputed_steps": reached - restored_step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe_event(event: dict[str, Any]) -> str:
    what = "restart after a failure" if event["event"] == "restart" else "resume"
    return (f"{what}: from {event['from_checkpoint']} (step {event['restored_step']}); the run had reached "
            f"step {event['reached_step']}, {event['recomputed_steps']} steps recomputed")


# ----------------------------------------------------------------------------- SIGTERM


class StopRequest:
    """Notices SIGTERM (what a spot preemption sends) so the loop can checkpoint before exiting.

    A Ray worker runs the loop off the main thread, where Python can set no signal handler, and
    Ray's own handler turns SIGTERM into an exit at a moment of its choosing. faulthandler can
    install a C-level handler from any thread: while training, SIGTERM writes a few bytes to a
    pipe instead of ending the process, and the loop reads the pipe (non-blocking) at the end of
    each step, saves, and leaves on its own terms. `close` puts the previous handler back.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        self._seen = False
        faulthandler.register(signal.SIGTERM, file=self._write, all_threads=False, chain=False)

    def requested(self) -> bool:
        if not self._seen:
            try:
                self._seen = bool(os.read(self._read, 1 << 16))
            except BlockingIOError:
                pass
        return self._seen

    def close(self) -> None:
        faulthandler.unregister(signal.SIGTERM)
        os.close(self._read)
        os.close(self._write)


# ----------------------------------------------------------------------------- fault injection


def describe_fault(fault: Any) -> str:
    if fault.crash_at_step is None:
        return "fault injection: off"
    return f"fault injection: ON ({fault.kind} on rank {fault.rank} after step {fault.crash_at_step}, fires once)"


def maybe_inject_fault(fault: Any, step: int, rank: int, run_dir: str | None, log: Callable[[str], None]) -> None:
    """Fail as configured, once: a marker in the run folder stops the restarted run repeating it."""
    if fault.crash_at_step != step or fault.rank != rank or run_dir is None:
        return
    marker = storage.join(run_dir, f"fault-{fault.kind}-step{step}-rank{rank}.fired")
    if storage.exists(marker):
        return
    storage.write_text(marker, time.strftime("%Y-%m-%dT%H:%M:%S%z\n"))
    log(f"fault injection: {fault.kind} on rank {rank} after step {step}")
    if fault.kind == "raise":
        raise InjectedFault(f"injected fault after step {step} on rank {rank}")
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.kind == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
