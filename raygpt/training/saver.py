"""Checkpoints that don't stop training (`run.async_save: true`).

The loop blocks only while the state is copied to host memory (`raygpt.checkpoint.snapshot`; for
fsdp, DCP's `async_save` staging each rank's shards); writing the files and storing them in the
run folder happen on a thread of this process. At most one save is in flight: the next save, the
end of the run and a SIGTERM save wait for it, and an error in it fails the run at that wait
instead of passing in silence. Completeness is the same as a synchronous save's (whole folders
renamed into place, state.json last), so a process killed mid-upload leaves the previous
checkpoint the newest complete one.

These checkpoints are not handed to `ray.train.report` (it would upload them on the loop's
thread): the run folder is pruned to `run.num_to_keep` here, as Ray Train prunes the ones it
registers, and the run's summary finds the best one from the state.json files.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from raygpt.errors import TrainingFailed


class BackgroundSave:
    """One checkpoint save at a time on a thread of its own."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""
        self.last_seconds = 0.0  # how long the last save took in the background

    def start(self, what: str, work: Callable[[], None]) -> None:
        """Run `work` (write and store `what`) once the save in flight, if any, is done."""
        self.wait()
        self._what = what

        def run() -> None:
            t0 = time.perf_counter()
            try:
                work()
            except BaseException as exc:  # re-raised on the loop's thread at the next wait
                self._error = exc
            self.last_seconds = time.perf_counter() - t0

        # A daemon: a process that is killed or fails does not wait for it (its checkpoint stays
        # invisible: no state.json), and the previous one is the newest complete.
        self._thread = threading.Thread(target=run, name="raygpt-checkpoint", daemon=True)
        self._thread.start()

    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Until the save in flight is stored; its error, if it failed, as TrainingFailed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise TrainingFailed(f"saving {self._what} in the background failed: {type(error).__name__}: "
                                 f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}") from error
