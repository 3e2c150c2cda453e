"""Failures survived on a real local Ray (slow tier): each run is compared with one
uninterrupted 2-worker reference run of the same config, computed once."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_corpus, tiny_config

from raygpt.checkpoint import load_checkpoint
from raygpt.errors import UserError
from raygpt.runs import read_events, read_metrics
from raygpt.training.ray_train import TrainingFailed, train

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def config(data_dir, storage, *extra):
    return tiny_config(data_dir, storage, "model.dropout=0.1", "run.num_workers=2", "train.save_freq=4",
                       "run.num_to_keep=5", *extra)


def quiet(*args):
    pass


@pytest.fixture(scope="module")
def reference(ray_address, data_dir, tmp_path_factory):
    storage = tmp_path_factory.mktemp("ref")
    train(config(data_dir, storage, "run.name=ref"), address=ray_address, log=quiet)
    return storage / "ref"


def final_weights(run_dir):
    latest = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]
    assert latest.name.startswith("checkpoint_0000012")
    return torch.load(latest / "model.pt", weights_only=True)


def curve(run_dir):
    return [(r["step"], r["train_loss"], r["val_loss"], r["tokens_seen"]) for r in read_metrics(str(run_dir))]


def assert_exact(reference, run_dir):
    a, b = final_weights(reference), final_weights(run_dir)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"final weights differ by {worst}"
    ref, got = curve(reference), curve(run_dir)
    assert [r[0] for r in got] == [r[0] for r in ref]
    assert all(abs(x[1] - y[1]) <= 1e-6 and abs(x[2] - y[2]) <= 1e-6 and x[3] == y[3] for x, y in zip(ref, got))


@pytest.mark.parametrize("kind, rank", [("raise", 1), ("kill", 0)])
def test_worker_failure_restarts_exactly(ray_address, data_dir, reference, tmp_path, kind, rank):
    cfg = config(data_dir, tmp_path, "run.name=f", "run.max_failures=1", "fault.crash_at_step=7",
                 f"fault.kind={kind}", f"fault.rank={rank}")
    train(cfg, address=ray_address, log=quiet)
    run = tmp_path / "f"
    assert_exact(reference, run)
    (event,) = read_events(str(run))
    # The progress marker may lag a hard kill by up to a second.
    assert event["event"] == "restart" and event["restored_step"] == 4
    assert event["reached_step"] >= event["restored_step"]
    assert event["recomputed_steps"] == event["reached_step"] - event["restored_step"]


def test_sigterm_saves_before_exit_so_the_restart_loses_no_step(ray_address, data_dir, reference, tmp_path):
    cfg = config(data_dir, tmp_path, "run.name=s", "run.max_failures=1", "fault.crash_at_step=6",
                 "fault.kind=sigterm", "fault.rank=1")
    train(cfg, address=ray_address, log=quiet)
    run = tmp_path / "s"
    assert_exact(reference, run)
    (event,) = read_events(str(run))
    # Rank 1 saved the step it was on when SIGTERM arrived (after step 6), not the step-4 checkpoint.
    assert event["event"] == "restart" and event["restored_step"] >= 7 and event["recomputed_steps"] == 0


def _loads(folder) -> bool:
    try:
        load_checkpoint(folder)
        return True
    except UserError:
        return False


def test_driver_killed_then_resumed_from_a_new_process(ray_address, data_dir, reference, tmp_path, run_cli):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(config(data_dir, tmp_path, "run.name=d").to_dict()))
    driver = subprocess.Popen([BIN / "raygpt", "train", "--config", str(cfg_file), "--address", ray_address],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "d" / "checkpoint_0000004"
    deadline = time.time() + 180
    # Ray uploads a checkpoint's files in no set order: wait until every file of it loads, so the
    # resume below has a complete checkpoint (a partial one is the corrupt-checkpoint test's case).
    while not _loads(first) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    assert _loads(first), "the run never completed its first checkpoint"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    import ray

    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)  # the dead driver's workers are torn down
    code, out, err = run_cli("train", "--resume", "d", "--address", ray_address,
                             "--set", f"run.storage_path={tmp_path}")
    assert code == 0, err
    assert_exact(reference, tmp_path / "d")
    (event,) = read_events(str(tmp_path / "d"))
    assert event["event"] == "resume" and event["restored_step"] >= 4


def test_corrupt_latest_checkpoint_is_skipped(ray_address, data_dir, reference, tmp_path, capfd):
    import shutil

    shutil.copytree(reference, tmp_path / "c")
    # A different run name: Ray's own snapshot of the reference must not be in play.
    (tmp_path / "c" / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)
    model = tmp_path / "c" / "checkpoint_0000012" / "model.pt"
    model.write_bytes(model.read_bytes()[:5000])
    os.remove(tmp_path / "c" / "checkpoint_0000008" / "optimizer.pt")
    cfg = config(data_dir, tmp_path, "run.name=c")
    train(cfg, address=ray_address, resume="c", log=quiet)
    out = capfd.readouterr()
    assert "skipping checkpoint" in out.out + out.err and "checkpoint_0000012" in out.out + out.err
    (event,) = read_events(str(tmp_path / "c"))
    assert event["restored_step"] == 4
    assert_exact(reference, tmp_path / "c")


def test_elastic_two_to_one_and_back(ray_address, data_dir, reference, tmp_path):
    base = ("run.name=e", "run.max_failures=0")
    with pytest.raises(TrainingFailed):
        train(config(data_dir, tmp_path, *base, "fault.crash_at_step=5"), address=ray_address, log=quiet)
    with pytest.raises(TrainingFailed):
        train(config(data_dir, tmp_path, *base, "run.num_workers=1", "fault.crash_at_step=9"),
              address=ray_address, resume="e", log=quiet)
    train(config(data_dir, tmp_path, *base), address=ray_address, resume="e", log=quiet)
    run = tmp_path / "e"
    assert [e["restored_step"] for e in read_events(str(run))] == [4, 8]
    ref, got = curve(reference), curve(run)
    assert [r[0] for r in got] == [r[0] for r in ref] and [r[3] for r in got] == [r[3] for r in ref]
    # Same global batches and samples on 1 or 2 workers, so the curve continues; dropout masks
    # are drawn per rank, so the steps on 1 worker are not bit-identical to those on 2.
    assert all(abs(x[2] - y[2]) < 2e-2 for x, y in zip(ref, got))
    assert got[-1][2] < got[0][2] - 1.0


def test_fsdp_worker_killed_restarts_exactly(ray_address, data_dir, tmp_path):
    """run.strategy fsdp on 2 Ray workers: each worker's shards land in one checkpoint folder, state.json
    with them; rank 0 SIGKILLed after step 7, the restart from step 4's sharded checkpoint ends bitwise
    equal to an uninterrupted fsdp run."""
    train(config(data_dir, tmp_path, "run.name=ref", "run.strategy=fsdp"), address=ray_address, log=quiet)
    train(config(data_dir, tmp_path, "run.name=f", "run.strategy=fsdp", "run.max_failures=1",
                 "fault.crash_at_step=7", "fault.kind=kill", "fault.rank=0"), address=ray_address, log=quiet)
    final = "checkpoint_0000012"
    assert sorted(p.name for p in (tmp_path / "f" / final).iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "state.json"]
    a = load_checkpoint(tmp_path / "ref" / final, with_optimizer=False)["model"]
    b = load_checkpoint(tmp_path / "f" / final, with_optimizer=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert curve(tmp_path / "ref") == curve(tmp_path / "f")
    (event,) = read_events(str(tmp_path / "f"))
    assert event["event"] == "restart" and event["restored_step"] == 4
