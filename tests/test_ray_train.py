"""`raygpt train` on a real local Ray (slow tier), and its refusals of bad input (fast)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_corpus, one_line_error, tiny_config

from raygpt.errors import UserError
from raygpt.runs import read_metrics
from raygpt.training.local import run_without_ray
from raygpt.training.ray_train import train

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def write_config(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


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


@pytest.fixture(scope="module")
def small_run(data_dir, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4, copied by each test that damages it."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("small") / "runs"
    cfg = tiny_config(data_dir, folder, "train.max_steps=4", "train.save_freq=2", "run.num_to_keep=2")
    run_without_ray(cfg, str(data_dir), str(folder / "r1"))
    (folder / "r1" / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    return folder


def copy_run(small_run, tmp_path) -> Path:
    import shutil

    shutil.copytree(small_run, tmp_path / "runs")
    return tmp_path / "runs" / "r1"


def edit_state(checkpoint: Path, **changes) -> None:
    state = json.loads((checkpoint / "state.json").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            state["config"][section][field] = value
        else:
            state[key] = value
    (checkpoint / "state.json").write_text(json.dumps(state))


HOLD_LEASE = ("import sys, time; from raygpt import runs; runs.Lease(sys.argv[1]).acquire(); "
              "print('held', flush=True); time.sleep(60)")


@pytest.mark.parametrize("no_ray", [False, True])
def test_two_writers_of_one_run_the_second_is_refused_before_anything_starts(run_cli, small_run, tmp_path, no_ray):
    run = copy_run(small_run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LEASE, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = one_line_error(run_cli, "train", "--resume", "r1", "--set", f"run.storage_path={run.parent}",
                             *(["--no-ray"] if no_ray else []))
        assert f"run {run} is being written by" in err and f":{holder.pid} (heartbeat" in err
    finally:
        holder.kill()
        holder.wait()


def test_a_resume_skips_a_damaged_newest_state_and_refuses_a_newer_format(run_cli, small_run, data_dir, tmp_path):
    from raygpt.runs import RunPaths
    from raygpt.training.ray_train import _check_resume

    run = copy_run(small_run, tmp_path)
    cfg = tiny_config(data_dir, run.parent)
    (run / "checkpoint_0000004" / "state.json").write_text("{truncated")
    said = []
    _check_resume(RunPaths(str(run.parent), "r1"), cfg, said.append)  # the step-2 checkpoint will do
    assert len(said) == 1 and "skipping checkpoint" in said[0] and "checkpoint_0000004" in said[0]
    edit_state(run / "checkpoint_0000002", format_version=7)
    err = one_line_error(run_cli, "train", "--resume", "r1", "--set", f"run.storage_path={run.parent}")
    assert "has format 7, newer than this raygpt reads (1); upgrade raygpt" in err


def test_a_resume_check_skips_checkpoints_the_loop_could_not_restore(run_cli, small_run, data_dir, tmp_path):
    """No weights beside state.json, or a step that is not a number: --check says so before Ray
    starts, instead of the launch failing inside."""
    import json

    run = copy_run(small_run, tmp_path)
    (run / "checkpoint_0000004" / "model.pt").unlink()
    state = json.loads((run / "checkpoint_0000002" / "state.json").read_text())
    (run / "checkpoint_0000002" / "state.json").write_text(json.dumps({**state, "step": "2"}))
    err = one_line_error(run_cli, "train", "--check", "--resume", "r1", "--set", f"run.storage_path={run.parent}")
    assert "run r1 has no checkpoint to resume from" in err and "none of them loads" in err
    code, out, err = run_cli("train", "--check", "--resume", "r1", "--set", f"run.storage_path={run.parent}")
    assert "checkpoint_0000004 is incomplete: it holds no model.pt" in out + err
    assert "step '2' in state.json is not a whole number" in out + err


def test_generate_falls_back_from_a_damaged_newest_checkpoint(run_cli, small_run, tmp_path):
    run = copy_run(small_run, tmp_path)
    model = run / "checkpoint_0000004" / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    code, out, err = run_cli("generate", "--checkpoint", str(run), "--prompt", "def", "--max-new-tokens", "4")
    assert code == 0, err
    assert out.startswith("def") and "skipping checkpoint" in err and "checkpoint_0000004" in err


@pytest.mark.parametrize("key, value, said", [
    ("model__context_len", 10**9, "context_len 1000000000 vs 16"),
    ("model__num_layers", "2", "num_layers '2' vs 2"),
    ("model__vocabulary_size", 100, "vocabulary_size 100"),
    ("model__num_heads", 0, "num_heads 0 does not divide"),
])
def test_generate_refuses_a_state_that_does_not_match_its_weights(run_cli, small_run, tmp_path, key, value, said):
    run = copy_run(small_run, tmp_path)
    edit_state(run / "checkpoint_0000004", **{key: value})
    err = one_line_error(run_cli, "generate", "--checkpoint", str(run / "checkpoint_0000004"), "--prompt", "x")
    assert "state.json's model config does not match model.pt" in err and said in err


def _damage(folder: Path, how: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    shard = folder / manifest["splits"]["train"]["shards"][0]["file"]
    if how == "missing":
        shard.unlink()
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    elif how == "empty":
        shard.write_bytes(b"")
    else:
        key, value = how.split("=")
        manifest[key] = int(value) if value.isdigit() else value
        (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("how, said", [
    ("missing", "is damaged: train-00000.arrow is missing"),
    ("truncated", "is damaged: train-00000.arrow has 100 bytes, the manifest says"),
    ("empty", "is damaged: train-00000.arrow has 0 bytes"),
    ("tokenizer=cl100k_base", "tokenizer 'cl100k_base' / dtype 'uint16'; this raygpt reads gpt2 / uint16"),
    ("dtype=uint32", "dtype 'uint32'"),
    ("format_version=9", "has format version 9, newer than this raygpt reads (1)"),
    ("format_version=one", "is not a raygpt token manifest"),
])
def test_data_that_cannot_be_trained_on_is_refused_before_ray_starts(run_cli, data_dir, tmp_path, how, said):
    import shutil

    shutil.copytree(data_dir, tmp_path / "data")
    _damage(tmp_path / "data", how)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "data", tmp_path / "runs"))
    assert said in one_line_error(run_cli, "train", "--config", str(cfg))


def test_check_hashes_local_shards_that_a_launch_only_size_checks(run_cli, data_dir, tmp_path):
    import shutil

    shutil.copytree(data_dir, tmp_path / "data")
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    shard = tmp_path / "data" / manifest["splits"]["train"]["shards"][0]["file"]
    body = bytearray(shard.read_bytes())
    body[-200:-100] = bytes(100)  # same size, other tokens: a bit-rotted or half-rewritten shard
    shard.write_bytes(bytes(body))
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "data", tmp_path / "runs"))
    err = one_line_error(run_cli, "train", "--check", "--config", str(cfg))
    assert "is damaged: train-00000.arrow differs from the manifest's sha256" in err


def test_a_vocabulary_smaller_than_the_datas_is_refused_before_ray_starts(run_cli, data_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(data_dir, tmp_path / "runs"))
    err = one_line_error(run_cli, "train", "--config", str(cfg), "--set", "model.vocabulary_size=100")
    assert "model.vocabulary_size 100 is smaller than the data's vocabulary (50257 gpt2 token ids" in err


@pytest.mark.parametrize("no_ray", [False, True])
def test_a_resume_on_other_data_is_refused(run_cli, small_run, data_dir, tmp_path, no_ray):
    import shutil

    run = copy_run(small_run, tmp_path)
    shutil.copytree(data_dir, tmp_path / "other")
    manifest = json.loads((tmp_path / "other" / "manifest.json").read_text())
    manifest["fingerprint"] = "f" * 64  # as a prepare of other inputs would leave it
    (tmp_path / "other" / "manifest.json").write_text(json.dumps(manifest))
    err = one_line_error(run_cli, "train", "--resume", "r1", "--set", f"run.storage_path={run.parent}",
                         "--set", f"data.dir={tmp_path / 'other'}", *(["--no-ray"] if no_ray else []))
    assert "was trained on data" in err and "but data.dir now holds ffffffffffff" in err


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
    # A piped run: no colour codes, no Ray error line on a healthy run.
    assert "\x1b[" not in proc.stdout + proc.stderr and "PreemptionWatcher" not in proc.stdout + proc.stderr
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
    (["run.use_gpu=true"], "1 CPU, 1 GPU"),  # this cluster has no GPU
])
def test_a_worker_larger_than_every_node_fails_at_once(ray_address, data_dir, tmp_path, overrides, asked):
    cfg = tiny_config(data_dir, tmp_path, *overrides)
    with pytest.raises(UserError, match=rf"each worker asks for {asked} .* but no node offers that \(node [0-9.]+: "):
        train(cfg, address=ray_address, log=lambda *a: None)
    assert not (tmp_path / cfg.run.name if cfg.run.name else tmp_path).joinpath("config.yaml").exists()


@pytest.mark.slow
def test_a_path_a_node_cannot_see_is_named_before_training(ray_address, tmp_path):
    from raygpt.cluster import check_paths_on_nodes, missing_here

    assert missing_here({"data.dir": str(tmp_path), "run folder": "s3://bucket/runs/x"}) == []
    # This cluster has one node; the check runs there (as on every node of a bigger cluster).
    import ray

    check = ray.remote(num_cpus=0)(missing_here)
    assert ray.get(check.remote({"data.dir": str(tmp_path / "nope")})) == [f"data.dir {tmp_path / 'nope'}"]
    with pytest.raises(UserError, match=r"data.dir .*nope not visible on node [0-9.]+: .*shared storage"):
        check_paths_on_nodes({"data.dir": str(tmp_path / "nope")})


# ----------------------------------------------------------------------------- fuzz: exit 0 or one line


FUZZ_VALUES = ["abc", ".nan", ".inf", "-.inf", "-1", "0", "1e30", "-0.5", "[1, 2]", "{a: 1}", "null", "true",
               "99999999999999999999", "''", "../x", "3.5"]


def _config_keys() -> list[str]:
    import dataclasses

    from raygpt.config import Config

    return [f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
            if dataclasses.is_dataclass(section.type)
            or hasattr(getattr(Config(), section.name), "__dataclass_fields__")
            for f in dataclasses.fields(getattr(Config(), section.name))]


def _assert_exit_0_or_one_line(run_cli, *args):
    code, out, err = run_cli(*args)
    assert code in (0, 2), (args, code, err[-2000:])
    if code == 2:
        assert err.startswith("raygpt: error: ") and err.count("\n") == 1, (args, err[-2000:])
    assert "Traceback" not in err, (args, err[-2000:])


def test_fuzzed_configs_exit_0_or_with_one_line(run_cli, data_dir, tmp_path):
    import random

    import ray

    ray_was_up = ray.is_initialized()
    cfg = write_config(tmp_path / "c.yaml", tiny_config(data_dir, tmp_path / "runs"))
    rng = random.Random(20261129)
    keys = _config_keys()
    for _ in range(150):
        sets = [a for _ in range(rng.randint(1, 3)) for a in ("--set", f"{rng.choice(keys)}={rng.choice(FUZZ_VALUES)}")]
        _assert_exit_0_or_one_line(run_cli, "train", "--check", "--config", str(cfg), *sets)
    assert ray.is_initialized() == ray_was_up  # nothing started


def _mutate(node, rng):
    """One random change somewhere in a JSON tree: a value replaced, or a key removed."""
    path = []
    while isinstance(node, (dict, list)) and node and rng.random() < 0.75:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append((node, key))
        node = node[key]
    if not path:
        return
    parent, key = path[-1]
    if isinstance(parent, dict) and rng.random() < 0.3:
        del parent[key]
    else:
        parent[key] = rng.choice([None, "x", -1, 0, 1e300, float("nan"), [], {}, True, 2**70, "../../x.arrow"])


def test_fuzzed_manifests_exit_0_or_with_one_line(run_cli, data_dir, tmp_path):
    import random
    import shutil

    shutil.copytree(data_dir, tmp_path / "data")
    original = json.loads((tmp_path / "data" / "manifest.json").read_text())
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "data", tmp_path / "runs"))
    rng = random.Random(1129)
    for _ in range(150):
        manifest = json.loads(json.dumps(original))
        for _ in range(rng.randint(1, 2)):
            _mutate(manifest, rng)
        (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
        _assert_exit_0_or_one_line(run_cli, "train", "--check", "--config", str(cfg))
