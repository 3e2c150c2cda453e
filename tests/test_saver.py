"""run.async_save: one background save at a time, its errors surfaced, host copies that training
cannot change, and runs that end as synchronous ones do."""

import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from helpers import make_corpus, tiny_config, tiny_overrides

from raygpt import checkpoint as ckpt
from raygpt.errors import TrainingFailed
from raygpt.model import GPTModel
from raygpt.runs import complete_checkpoints, read_metrics
from raygpt.training.local import run_without_ray
from raygpt.training.saver import BackgroundSave


def test_one_save_in_flight_and_the_next_waits_for_it():
    saver, gate, order = BackgroundSave(), threading.Event(), []

    def first():
        gate.wait(5)
        order.append("first")

    saver.start("checkpoint_1", first)
    assert saver.in_flight()
    threading.Timer(0.2, gate.set).start()
    saver.start("checkpoint_2", lambda: order.append("second"))  # blocks until the first is stored
    saver.wait()
    assert order == ["first", "second"] and not saver.in_flight()


def test_a_failed_background_save_fails_the_run_at_the_next_wait():
    saver = BackgroundSave()

    def broken():
        raise OSError("No space left on device")

    saver.start("checkpoint_0000008", broken)
    with pytest.raises(TrainingFailed, match=r"saving checkpoint_0000008 in the background failed: OSError: No space"):
        saver.wait()
    saver.wait()  # reported once


def test_a_snapshot_is_a_host_copy_that_training_does_not_change(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(embedding_dim=16, num_layers=1, num_heads=2, context_len=8, vocabulary_size=50,
                     tie_embeddings=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step():
        model(torch.randint(0, 50, (2, 8))).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    copied = ckpt.snapshot(model, optimizer)
    ckpt.save_checkpoint(tmp_path / "sync", model, optimizer, {"config": {"model": {}}})
    step()  # training goes on while the copy is written
    ckpt.save_snapshot(tmp_path / "async", copied, {"config": {"model": {}}})
    a = ckpt.load_checkpoint(tmp_path / "sync")
    b = ckpt.load_checkpoint(tmp_path / "async")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["model"]["tok_emb.weight"] is b["model"]["out_head.weight"]  # the tied head stays one tensor
    for i, values in a["optimizer"]["state"].items():
        assert all(torch.equal(values[k], b["optimizer"]["state"][i][k]) for k in values)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def final_model(run_dir):
    return ckpt.load_checkpoint(complete_checkpoints(str(run_dir))[-1], with_optimizer=False)["model"]


def test_an_async_run_ends_as_a_sync_run_and_keeps_num_to_keep(data_dir, tmp_path):
    torch.set_num_threads(1)
    run_without_ray(tiny_config(data_dir, tmp_path, "train.save_freq=2"), str(data_dir), str(tmp_path / "sync"))
    run_without_ray(tiny_config(data_dir, tmp_path, "train.save_freq=2", "run.async_save=true", "run.num_to_keep=2"),
                    str(data_dir), str(tmp_path / "async"))
    a, b = final_model(tmp_path / "sync"), final_model(tmp_path / "async")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(str(tmp_path / "sync"))[-1]["val_loss"] == read_metrics(str(tmp_path / "async"))[-1]["val_loss"]
    kept = [uri.rsplit("/", 1)[-1] for uri in complete_checkpoints(str(tmp_path / "async"))]
    assert len(kept) <= 3 and kept[-1] == "checkpoint_0000012"  # 2 best by val_loss, and the newest


@pytest.mark.slow
def test_a_kill_while_saving_in_the_background_resumes_exactly(data_dir, tmp_path):
    """SIGKILL right after the step-8 save went to the background: whatever the thread got done,
    every checkpoint with a state.json loads, and the resume from the newest ends bitwise as an
    uninterrupted run."""
    overrides = tiny_overrides(data_dir, tmp_path) + ["run.async_save=true", "run.name=r", "run.num_to_keep=5"]
    torch.set_num_threads(1)
    from raygpt.config import load_config

    run_without_ray(load_config(None, overrides), str(data_dir), str(tmp_path / "whole"))
    code = ("import sys, torch; from raygpt.config import load_config; from raygpt.training.local import "
            "run_without_ray; torch.set_num_threads(1); "
            f"run_without_ray(load_config(None, {overrides + ['fault.kind=kill', 'fault.crash_at_step=8']!r}), "
            f"{str(data_dir)!r}, {str(tmp_path / 'killed')!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    for uri in complete_checkpoints(str(tmp_path / "killed")):
        ckpt.load_checkpoint(uri)  # complete means loadable
    run_without_ray(load_config(None, overrides), str(data_dir), str(tmp_path / "killed"))
    a, b = final_model(tmp_path / "whole"), final_model(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
