"""Crash safety: the pure parts, and failures survived without Ray (one process)."""

import os
import shutil
import signal

import pytest
import torch
from helpers import make_corpus, tiny_config

from raygpt import checkpoint as ckpt
from raygpt import runs
from raygpt.errors import UserError
from raygpt.runs import read_events, read_metrics
from raygpt.training import recovery
from raygpt.training.local import run_without_ray


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run (dropout on, so RNG handling matters), computed once."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run(reference_config(data_dir, run_dir.parent), data_dir, run_dir)
    return run_dir


def reference_config(data_dir, storage, *extra):
    return tiny_config(data_dir, storage, "model.dropout=0.1", "train.save_freq=4", *extra)


def run(cfg, data_dir, run_dir):
    torch.set_num_threads(1)
    return run_without_ray(cfg, str(data_dir), str(run_dir))


def assert_same_run(ref_dir, run_dir, ckpt_name="checkpoint_0000012"):
    a = torch.load(ref_dir / "checkpoint_0000012" / "model.pt", weights_only=True)
    b = torch.load(run_dir / ckpt_name / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ from the uninterrupted run"
    curve = lambda d: [(r["step"], r["train_loss"], r["val_loss"], r["tokens_seen"]) for r in read_metrics(str(d))]  # noqa: E731
    assert curve(ref_dir) == curve(run_dir)


# ----------------------------------------------------------------------------- pure parts


def test_restart_event_tells_restart_from_resume(tmp_path):
    (tmp_path / "progress.json").write_text('{"fit_id": "abc", "step": 9}')
    event = recovery.restart_event(str(tmp_path), "abc", 5, str(tmp_path / "checkpoint_0000005"))
    assert event["event"] == "restart" and event["recomputed_steps"] == 4
    assert event["from_checkpoint"] == "checkpoint_0000005"
    assert recovery.restart_event(str(tmp_path), "other", 5, "x/checkpoint_0000005")["event"] == "resume"
    assert "4 steps recomputed" in recovery.describe_event(event)


def test_fault_fires_once(tmp_path):
    from raygpt.config import FaultConfig

    fault = FaultConfig(crash_at_step=3, kind="raise", rank=1)
    recovery.maybe_inject_fault(fault, 3, 0, str(tmp_path), print)  # another rank: nothing
    recovery.maybe_inject_fault(fault, 2, 1, str(tmp_path), print)  # another step: nothing
    with pytest.raises(recovery.InjectedFault):
        recovery.maybe_inject_fault(fault, 3, 1, str(tmp_path), print)
    recovery.maybe_inject_fault(fault, 3, 1, str(tmp_path), print)  # the restarted run passes
    assert "fault injection: ON (raise on rank 1 after step 3" in recovery.describe_fault(fault)


def test_all_checkpoints_damaged_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / "checkpoint_0000004").mkdir()
    warnings = []
    with pytest.raises(UserError, match="none of the 1 checkpoints"):
        ckpt.load_newest_valid(runs.list_checkpoints(str(tmp_path))[::-1], warnings.append)
    assert "skipping checkpoint" in warnings[0] and "no state.json" in warnings[0]


# ----------------------------------------------------------------------------- failures, no Ray


def test_exception_then_rerun_is_exact(data_dir, reference, tmp_path):
    cfg = reference_config(data_dir, tmp_path, "fault.crash_at_step=6")
    with pytest.raises(recovery.InjectedFault):
        run(cfg, data_dir, tmp_path / "run")
    run(cfg, data_dir, tmp_path / "run")  # the fault fired once; this run resumes from step 4
    assert_same_run(reference, tmp_path / "run")
    (event,) = read_events(str(tmp_path / "run"))
    assert event["restored_step"] == 4 and event["reached_step"] >= 6


def test_a_crash_between_reports_logs_every_step_once(data_dir, reference, tmp_path):
    from raygpt.runs import read_steps

    # Reports every 2 steps, checkpoints every 4, a crash after step 7: the log holds steps 5 and
    # 6 (written by the step-6 report) when the run resumes from step 4 and computes them again.
    cfg = reference_config(data_dir, tmp_path, "train.eval_freq=2", "fault.crash_at_step=7")
    with pytest.raises(recovery.InjectedFault):
        run(cfg, data_dir, tmp_path / "run")
    assert [r["step"] for r in read_steps(str(tmp_path / "run"))] == [1, 2, 3, 4, 5, 6]
    run(cfg, data_dir, tmp_path / "run")
    steps = read_steps(str(tmp_path / "run"))
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert [r["train_loss"] for r in steps] == [r["train_loss"] for r in read_steps(str(reference))]


def test_sigterm_saves_a_checkpoint_so_no_step_is_lost(data_dir, reference, tmp_path):
    cfg = reference_config(data_dir, tmp_path, "fault.crash_at_step=6", "fault.kind=sigterm")
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or Ray's if this process joined a Ray
    with pytest.raises(recovery.Preempted):
        run(cfg, data_dir, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint_0000007" / "state.json").is_file()  # saved at the next step end
    assert signal.getsignal(signal.SIGTERM) is before  # handler put back
    run(cfg, data_dir, tmp_path / "run")
    assert_same_run(reference, tmp_path / "run")
    (event,) = read_events(str(tmp_path / "run"))
    assert event["restored_step"] == 7 and event["recomputed_steps"] == 0


def test_damaged_and_partial_checkpoints_are_skipped(data_dir, reference, tmp_path, capsys):
    cfg = reference_config(data_dir, tmp_path)
    shutil.copytree(reference, tmp_path / "run")
    model = tmp_path / "run" / "checkpoint_0000012" / "model.pt"
    model.write_bytes(model.read_bytes()[: len(model.read_bytes()) // 2])  # truncated
    os.remove(tmp_path / "run" / "checkpoint_0000008" / "optimizer.pt")  # partial
    run(cfg, data_dir, tmp_path / "run")
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "checkpoint_0000012: " in out and "model.pt does not load" in out
    assert "checkpoint_0000008 is incomplete: optimizer.pt is missing" in out
    (event,) = read_events(str(tmp_path / "run"))
    assert event["restored_step"] == 4
    assert_same_run(reference, tmp_path / "run", ckpt_name="checkpoint_0000012-1")
