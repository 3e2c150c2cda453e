"""Search definition and expansion (fast), and searches on a real local Ray (slow)."""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raygpt.analysis import analyze
from raygpt.config import load_config
from raygpt.errors import UserError
from raygpt.tune import expand, load_search, parse_search

from helpers import make_corpus, tiny_config

BIN = Path(sys.executable).parent
JOBS = Path(__file__).resolve().parent.parent / "jobs"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def search_raw(data_dir, storage, space=None, **tune):
    base = tiny_config(data_dir, storage, "train.eval_freq=2", "train.save_freq=6", "run.num_to_keep=1").to_dict()
    base["run"]["name"] = None
    # Strong learning rates first: asynchronous ASHA judges a trial against those that reached the
    # rung before it, so weak trials launched after strong ones are stopped (in the other order
    # the weak ones set the bar and every trial may pass).
    return {**base, "search": space or {"optim.peak_lr": {"grid": [0.03, 0.005, 0.002, 0.0001]},
                                        "train.batch_size": {"grid": [4, 8]}},
            "tune": {"grace_period": 2, "reduction_factor": 2, "max_concurrent_trials": 2, **tune}}


# ----------------------------------------------------------------------------- definition (fast)


def test_default_search_file_covers_a_grid(data_dir):
    search = load_search(str(JOBS / "tune.yaml"), [f"data.dir={data_dir}", "model.context_len=16"])
    trials, rejected = expand(search)
    assert len(trials) == 8 and not rejected


def test_grid_times_samples_and_draws_are_reproducible(data_dir, tmp_path):
    space = {"optim.peak_lr": {"grid": [0.001, 0.01]}, "model.dropout": {"uniform": [0.0, 0.2]},
             "optim.weight_decay": {"choice": [0.0, 0.1]}, "optim.min_lr": {"loguniform": [1e-5, 1e-4]}}
    search = parse_search(search_raw(data_dir, tmp_path, space, num_samples=3, seed=5))
    trials, rejected = expand(search)
    assert len(trials) == 6 and not rejected
    assert all(0.0 <= t.config.model.dropout <= 0.2 and 1e-5 <= t.config.optim.min_lr <= 1e-4 for t in trials)
    again, _ = expand(parse_search(search_raw(data_dir, tmp_path, space, num_samples=3, seed=5)))
    assert [t.overrides for t in trials] == [t.overrides for t in again]


def test_the_seeds_nine_keys_are_searchable(data_dir, tmp_path):
    space = {"train.batch_size": {"grid": [4]}, "model.dropout": {"grid": [0.1]},
             "optim.warmup_steps": {"grid": [2]}, "optim.weight_decay": {"grid": [0.01]},
             "optim.max_norm": {"grid": [0.5]}, "optim.peak_lr": {"grid": [0.005]},
             "optim.initial_lr": {"grid": [0.0001]}, "optim.min_lr": {"grid": [0.00001]},
             "train.num_epochs": {"grid": [2]}}
    raw = search_raw(data_dir, tmp_path, space)
    raw["train"]["max_steps"] = None  # num_epochs decides the length
    (trial,), _ = expand(parse_search(raw))
    from raygpt.data import load_manifest, num_windows

    windows = num_windows(load_manifest(data_dir)["splits"]["train"]["tokens"], 16, 16)
    assert trial.total_steps == 2 * (windows // 4)  # batch size and epochs set the schedule's length
    assert trial.config.optim.max_norm == 0.5 and trial.config.train.num_epochs == 2


def test_rejected_combinations_are_counted_with_reasons(data_dir, tmp_path):
    space = {"optim.min_lr": {"grid": [0.0001, 0.5]}, "train.batch_size": {"grid": [8, 3]},
             "optim.warmup_steps": {"grid": [2, 50]}}
    raw = search_raw(data_dir, tmp_path, space)
    raw["run"]["num_workers"] = 2
    trials, rejected = expand(parse_search(raw))
    assert len(trials) == 1 and len(rejected) == 7
    assert any("optim.min_lr (0.5) must be <= optim.peak_lr" in r for r in rejected)
    assert any("does not divide over run.num_workers 2" in r for r in rejected)
    assert any("optim.warmup_steps 50 must be < total steps 12" in r for r in rejected)


@pytest.mark.parametrize(
    "space, tune, message",
    [
        ({"optim.peak": {"grid": [1]}}, {}, "search key 'optim.peak' is not a config key; valid keys: model.embedding_dim"),
        ({"optim.peak_lr": {"grid": []}}, {}, "grid needs a non-empty list"),
        ({"optim.peak_lr": {"uniform": [0.01, 0.001]}}, {}, r"uniform needs low < high, got \[0.01, 0.001\]"),
        ({"optim.peak_lr": {"loguniform": [0, 1]}}, {}, "loguniform needs low > 0"),
        ({"optim.peak_lr": [0.1]}, {}, "give one of grid, choice, uniform, loguniform"),
        ({"run.num_workers": {"grid": [1, 2]}}, {}, "run settings and the data folder are fixed"),
        ({"optim.peak_lr": {"grid": [0.1]}}, {"grace_period": 20, "max_t": 10}, "grace_period 20 must be <= tune.max_t 10"),
        ({"optim.peak_lr": {"grid": [0.1]}}, {"metric": "val_acc"}, "tune.metric 'val_acc' is never reported"),
        ({"optim.peak_lr": {"grid": [0.1]}}, {"time_attr": "training_iteration"}, "tune.time_attr must be one of step, tokens_seen"),
        ({"optim.peak_lr": {"grid": [0.1]}}, {"bogus": 1}, "unknown tune setting 'tune.bogus'"),
    ],
)
def test_bad_search_definitions(data_dir, tmp_path, space, tune, message):
    with pytest.raises(UserError, match=message):
        parse_search(search_raw(data_dir, tmp_path, space, **tune))


def test_set_values_leave_the_search_base_plain_data(data_dir, tmp_path):
    search = parse_search(search_raw(data_dir, tmp_path), ["data.dir=/elsewhere", "train.max_steps=9"])
    assert search.base["data"]["dir"] == "/elsewhere" and search.base["train"]["max_steps"] == 9
    assert yaml.safe_load(yaml.safe_dump(search.base)) == search.base  # saved with the experiment


def test_empty_search_section(data_dir, tmp_path):
    raw = search_raw(data_dir, tmp_path)
    raw["search"] = {}
    with pytest.raises(UserError, match="needs a non-empty `search` section"):
        parse_search(raw)


def test_cli_refuses_resume_and_analyze_of_a_folder_without_experiment(run_cli, tmp_path):
    code, _, err = run_cli("tune", "--resume", str(tmp_path))
    assert code == 2 and "no raygpt experiment to resume" in err
    code, _, err = run_cli("analyze", str(tmp_path))
    assert code == 2 and "no raygpt experiment in" in err


# ----------------------------------------------------------------------------- on Ray (slow)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_search_with_asha_analysis_and_best_config(ray_address, data_dir, tmp_path, run_cli):
    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(search_raw(data_dir, tmp_path / "runs", name="exp")))
    code, out, err = run_cli("tune", "--config", str(cfg), "--address", ray_address)
    assert code == 0, err
    experiment = tmp_path / "runs" / "exp"
    analysis = analyze(str(experiment))
    rows = analysis.rows
    assert len(rows) == 6 and all(r["status"] == "TERMINATED" for r in rows)  # 6 trials, 2 at a time: no leak
    assert any(r["stopped_early"] for r in rows), "ASHA stopped no trial"
    assert rows[0]["best_val_loss"] == min(r["best_val_loss"] for r in rows)
    assert all(r["rung"] is not None for r in rows if r["stopped_early"])
    assert analysis.tokens_trained < analysis.tokens_full_grid
    assert "tokens trained:" in out and "best trial" in out
    # peak_lr 0.0001 is below initial_lr 0.001: both of its combinations are refused before launch.
    assert "8 configurations, 6 to launch, 2 rejected before launch" in out
    table = read_csv(experiment / "trials.csv")
    assert [r["trial_id"] for r in table] == [r["trial_id"] for r in rows]
    assert (experiment / "val_loss_curves.png").stat().st_size > 10_000
    assert not Path(rows[0]["best_checkpoint"]).is_absolute()
    assert (experiment / rows[0]["best_checkpoint"] / "model.pt").is_file()

    best = load_config(experiment / "best_config.yaml")  # a complete config, as is
    winner = rows[0]
    assert best.optim.peak_lr == winner["optim.peak_lr"] and best.train.batch_size == winner["train.batch_size"]

    # The same table from a fresh process, on a copy of the experiment in another place.
    import shutil

    moved = tmp_path / "elsewhere" / "exp"
    shutil.copytree(experiment, moved)
    proc = subprocess.run([BIN / "raygpt", "analyze", str(moved), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_csv(tmp_path / "out" / "trials.csv") == table

    code, out, err = run_cli("train", "--config", str(experiment / "best_config.yaml"), "--address", ray_address,
                             "--set", f"run.storage_path={tmp_path / 'final'}")
    assert code == 0, err


@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(ray_address, data_dir, tmp_path, run_cli):
    import ray

    space = {"optim.peak_lr": {"grid": [0.001, 0.003, 0.01]}}
    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(search_raw(data_dir, tmp_path / "runs", space, name="exp",
                                             max_concurrent_trials=1, early_stopping=False)))
    driver = subprocess.Popen([BIN / "raygpt", "tune", "--config", str(cfg), "--address", ray_address],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    experiment = tmp_path / "runs" / "exp"
    deadline = time.time() + 300
    finished = []
    while time.time() < deadline and driver.poll() is None:
        finished = [p for p in experiment.glob("train-*") if (p / "checkpoint_0000012").is_dir()]
        started = list(experiment.glob("train-*"))
        if finished and len(started) >= 2:
            break
        time.sleep(0.5)
    assert finished, "no trial finished before the deadline"
    time.sleep(3)  # let Tune record the finished trial in its experiment state
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    done_before = {p.name: (p / "metrics.jsonl").read_text() for p in finished}

    code, out, err = run_cli("tune", "--resume", str(experiment), "--address", ray_address)
    assert code == 0, err
    rows = analyze(str(experiment)).rows
    assert len(rows) == 3 and all(r["status"] == "TERMINATED" and r["steps"] == 12 for r in rows)
    for name, text in done_before.items():
        assert (experiment / name / "metrics.jsonl").read_text() == text  # not run again
