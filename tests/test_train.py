"""`raygpt train` on a real local Ray (slow tier), and its refusals of bad input (fast)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from raygpt.errors import UserError
from raygpt.loop import read_metrics, run_without_ray
from raygpt.train import train

from helpers import make_corpus, tiny_config

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def write_config(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def one_line_error(run_cli, *args) -> str:
    code, out, err = run_cli(*args)
    assert code == 2, (out, err)
    assert err.startswith("raygpt: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- bad input (no Ray needed)


def test_missing_config_file(run_cli, tmp_path):
    assert "config file not found" in one_line_error(run_cli, "train", "--config", str(tmp_path / "nope.yaml"))


def test_config_not_yaml(run_cli, tmp_path):
    (tmp_path / "c.yaml").write_text("train: [unclosed\n")
    assert "is not valid YAML" in one_line_error(run_cli, "train", "--config", str(tmp_path / "c.yaml"))


def test_unknown_key(run_cli, data_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(data_dir, tmp_path))
    err = one_line_error(run_cli, "train", "--config", str(cfg), "--set", "train.batchsize=4")
    assert "unknown config key 'train.batchsize'; valid keys in train: batch_size" in err


def test_warmup_not_below_total_steps(run_cli, data_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(data_dir, tmp_path))
    err = one_line_error(run_cli, "train", "--config", str(cfg), "--set", "optim.warmup_steps=12")
    assert "optim.warmup_steps 12 must be < total steps 12" in err


def test_data_without_manifest(run_cli, data_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(data_dir, tmp_path, f"data.dir={tmp_path / 'empty'}"))
    err = one_line_error(run_cli, "train", "--config", str(cfg))
    assert "no manifest.json" in err and "raygpt prepare" in err


def test_batch_not_dividing_over_workers(run_cli, data_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(data_dir, tmp_path))
    err = one_line_error(run_cli, "train", "--config", str(cfg), "--set", "run.num_workers=3")
    assert "train.batch_size 8 does not divide over run.num_workers 3" in err


def test_batch_larger_than_dataset(run_cli, data_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(data_dir, tmp_path))
    err = one_line_error(run_cli, "train", "--config", str(cfg), "--set", "train.batch_size=4096")
    assert "train.batch_size 4096 is larger than the dataset" in err


def test_resume_of_a_run_without_checkpoint(run_cli, data_dir, tmp_path):
    (tmp_path / "runs" / "empty-run").mkdir(parents=True)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(data_dir, tmp_path / "runs"))
    err = one_line_error(run_cli, "train", "--config", str(cfg), "--resume", "empty-run")
    assert "run empty-run has no checkpoint to resume from" in err


def test_resume_of_an_unknown_run(run_cli, tmp_path):
    err = one_line_error(run_cli, "train", "--resume", "ghost", "--set", f"run.storage_path={tmp_path}")
    assert "no run to resume" in err


def test_resume_with_a_different_model_shape(run_cli, data_dir, tmp_path):
    torch.set_num_threads(1)
    small = tiny_config(data_dir, tmp_path, "train.max_steps=4", "train.save_freq=4")
    run_without_ray(small, str(data_dir), str(tmp_path / "runs" / "r1"))
    cfg = write_config(tmp_path / "c.yaml", tiny_config(data_dir, tmp_path / "runs", "model.num_layers=3"))
    err = one_line_error(run_cli, "train", "--config", str(cfg), "--resume", "r1")
    assert "different model shape" in err and "num_layers 2 vs 3" in err


def test_existing_run_name_is_not_resumed_by_accident(run_cli, data_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    cfg = write_config(tmp_path / "c.yaml", tiny_config(data_dir, tmp_path, "run.name=taken"))
    err = one_line_error(run_cli, "train", "--config", str(cfg))
    assert "run taken already exists" in err and "--resume taken" in err


def test_generate_from_a_checkpoint(run_cli, data_dir, tmp_path):
    torch.set_num_threads(1)
    run_without_ray(tiny_config(data_dir, tmp_path, "train.max_steps=4"), str(data_dir), str(tmp_path / "run"))
    args = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "def add(", "--max-new-tokens", "8"]
    code, out, err = run_cli(*args, "--temperature", "1.0", "--top-k", "20", "--seed", "3")
    assert code == 0, err
    assert out.startswith("def add(") and len(out) > len("def add(\n")
    assert run_cli(*args, "--temperature", "1.0", "--top-k", "20", "--seed", "3")[1] == out
    err = one_line_error(run_cli, "generate", "--checkpoint", str(tmp_path), "--prompt", "x")
    assert "no checkpoint at" in err


def test_generate_from_a_damaged_checkpoint(run_cli, data_dir, tmp_path):
    torch.set_num_threads(1)
    run_without_ray(tiny_config(data_dir, tmp_path, "train.max_steps=4"), str(data_dir), str(tmp_path / "run"))
    model = tmp_path / "run" / "checkpoint_0000004" / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    err = one_line_error(run_cli, "generate", "--checkpoint", str(model.parent), "--prompt", "x")
    assert "is damaged: model.pt does not load" in err


# ----------------------------------------------------------------------------- real Ray


@pytest.mark.slow
def test_one_worker_run_on_ray(ray_address, data_dir, tmp_path):
    summary = train(tiny_config(data_dir, tmp_path, "run.name=one"), address=ray_address, log=lambda *a: None)
    run = tmp_path / "one"
    rows = read_metrics(str(run))
    assert [r["step"] for r in rows] == [0, 4, 8, 12]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 1.0
    assert summary["metrics"]["step"] == 12
    # num_to_keep=2 best by val_loss; the latest is always kept.
    kept = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())
    assert kept == ["checkpoint_0000008", "checkpoint_0000012"]
    assert summary["latest_checkpoint"].endswith("checkpoint_0000012")
    assert (run / "loss.png").stat().st_size > 10_000 and (run / "config.yaml").is_file()


@pytest.mark.slow
def test_two_workers_via_the_cli_follow_the_one_worker_curve(ray_address, data_dir, tmp_path):
    one = tmp_path / "one"
    train(tiny_config(data_dir, one, "run.name=ref"), address=ray_address, log=lambda *a: None)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(data_dir, tmp_path, "run.name=two", "run.num_workers=2"))
    proc = subprocess.run([BIN / "raygpt", "train", "--config", str(cfg), "--address", ray_address],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step     12/12" in proc.stdout + proc.stderr and "plot:" in proc.stdout
    ref, two = read_metrics(str(one / "ref")), read_metrics(str(tmp_path / "two"))
    assert [r["step"] for r in two] == [r["step"] for r in ref]
    assert two[-1]["val_loss"] < two[0]["val_loss"] - 1.0
    # Both see the same global batch each step; only float summation order differs.
    for a, b in zip(ref, two):
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-3 and abs(a["train_loss"] - b["train_loss"]) < 1e-3
        assert a["tokens_seen"] == b["tokens_seen"]


@pytest.mark.slow
def test_resume_continues_where_the_run_stopped(ray_address, data_dir, tmp_path, run_cli):
    first = tiny_config(data_dir, tmp_path, "run.name=r", "train.max_steps=6", "train.save_freq=3")
    train(first, address=ray_address, log=lambda *a: None)
    assert [r["step"] for r in read_metrics(str(tmp_path / "r"))] == [0, 3, 4, 6]  # evals and saves
    code, out, err = run_cli("train", "--resume", "r", "--address", ray_address,
                             "--set", f"run.storage_path={tmp_path}", "--set", "train.max_steps=10")
    assert code == 0, err
    rows = read_metrics(str(tmp_path / "r"))
    assert [r["step"] for r in rows] == [0, 3, 4, 6, 8, 9, 10]  # one log, no step twice
    state = json.loads((tmp_path / "r" / "checkpoint_0000010" / "state.json").read_text())
    assert state["tokens_seen"] == 10 * 8 * 16 and state["config"]["train"]["max_steps"] == 10


@pytest.mark.slow
def test_more_workers_than_the_cluster_has_fails_at_once(ray_address, data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path, "run.num_workers=4")
    with pytest.raises(UserError, match=r"asks for 4 CPU \(4 workers x 1\) but the cluster has 2 CPU"):
        train(cfg, address=ray_address, log=lambda *a: None)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, asked", [
    (["run.cpus_per_worker=3"], "3 CPU"),
    (["run.use_gpu=true", "run.gpus_per_worker=2"], "1 CPU, 2 GPU"),
])
def test_a_worker_larger_than_every_node_fails_at_once(ray_address, data_dir, tmp_path, overrides, asked):
    cfg = tiny_config(data_dir, tmp_path, *overrides)
    with pytest.raises(UserError, match=rf"each worker asks for {asked} .* but no node offers that \(node [0-9.]+: "):
        train(cfg, address=ray_address, log=lambda *a: None)
    assert not (tmp_path / cfg.run.name if cfg.run.name else tmp_path).joinpath("config.yaml").exists()


@pytest.mark.slow
def test_a_path_a_node_cannot_see_is_named_before_training(ray_address, tmp_path):
    from raygpt.train import check_paths_on_nodes, missing_here

    assert missing_here({"data.dir": str(tmp_path), "run folder": "s3://bucket/runs/x"}) == []
    # This cluster has one node; the check runs there (as on every node of a bigger cluster).
    import ray

    check = ray.remote(num_cpus=0)(missing_here)
    assert ray.get(check.remote({"data.dir": str(tmp_path / "nope")})) == [f"data.dir {tmp_path / 'nope'}"]
    with pytest.raises(UserError, match=r"data.dir .*nope not visible on node [0-9.]+: .*shared storage"):
        check_paths_on_nodes({"data.dir": str(tmp_path / "nope")})
