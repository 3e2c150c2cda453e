"""Searches on a real local Ray (slow), and the pure parts of running one (fast)."""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import make_corpus, make_prose_corpus, search_raw, tiny_config

from raygpt.config import load_config
from raygpt.errors import UserError
from raygpt.runs import read_events
from raygpt.search.analysis import _tokens_to_max_t, analyze
from raygpt.search.spec import TuneSettings, expand, parse_search, rung_milestones
from raygpt.search.tune import (
    rung_save_steps,
    runs_in_trial,
    trial_footprint,
    trial_reservation,
    trial_save_steps,
    trials_that_fit,
)

BIN = Path(sys.executable).parent
JOBS = Path(__file__).resolve().parent.parent / "jobs"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


# ----------------------------------------------------------------------------- running a search (fast)


def test_trials_that_fit_count_by_the_scarcest_resource():
    assert trials_that_fit({"CPU": 2.0, "memory": 1e9}, {"CPU": 1.0}) == 2
    assert trials_that_fit({"CPU": 2.0}, {"CPU": 2.0}) == 1
    # A trial's driver at 0.01 CPU beside a 1-CPU worker: the second trial would wait on 2 CPUs.
    assert trials_that_fit({"CPU": 2.0}, {"CPU": 1.01}) == 1
    assert trials_that_fit({"CPU": 8.0, "GPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}) == 2
    assert trials_that_fit({"CPU": 1.0}, {"CPU": 2.0}) == 0


def test_a_trial_holds_its_workers_whether_it_runs_in_the_trial_or_a_trainer(data_dir, tmp_path):
    one = tiny_config(data_dir, tmp_path, "run.cpus_per_worker=2")
    two = tiny_config(data_dir, tmp_path, "run.num_workers=2")
    settings = TuneSettings()
    assert runs_in_trial(one, settings) and trial_reservation(one, settings) == {"CPU": 2.0}
    assert not runs_in_trial(two, settings) and trial_footprint(two, settings) == {"CPU": 2.0}
    assert trial_reservation(two, settings) == {"memory": 1}  # the workers are the Train controller's to ask for
    assert not runs_in_trial(one, TuneSettings(in_process=False))


def test_a_trial_saves_where_asha_judges_it(data_dir, tmp_path):
    """Rungs at 2, 4, 8 steps (grace 2, factor 2, max_t 12); reports every 3 steps: ASHA judges
    the reports at 3, 6 and 9, so the trial saves there (12 is its end, saved anyway)."""
    search = parse_search(search_raw(data_dir, tmp_path, {"optim.peak_lr": {"grid": [0.01]}}))
    (trial,), _ = expand(search)
    trial.config.train.eval_freq, trial.config.train.save_freq = 3, 100
    assert rung_milestones(search.settings, 12) == [2, 4, 8]
    assert rung_save_steps(trial, search.settings, 12) == (3, 6, 9)
    tokens = TuneSettings(time_attr="tokens_seen", grace_period=200, reduction_factor=2)
    # 8 x 16 = 128 tokens a step: rungs at 200, 400, 800 tokens are steps 2, 4, 7 -> reports 3, 6, 9
    assert rung_save_steps(trial, tokens, 12 * 128) == (3, 6, 9)
    assert trial_save_steps(trial, search.settings, 12) == (3, 6, 9)
    # HyperBand may pause a trial at any report (and resume it from its checkpoint); no early stopping: none
    assert trial_save_steps(trial, TuneSettings(scheduler="hyperband"), 12) == (3, 6, 9)
    trial.config.train.eval_freq = 2
    assert trial_save_steps(trial, TuneSettings(scheduler="hyperband"), 12) == (2, 4, 6, 8, 10)
    assert trial_save_steps(trial, TuneSettings(early_stopping=False), 12) == ()


def test_full_grid_counts_every_launched_trial_to_max_t():
    assert _tokens_to_max_t(100, 10, "step", 40) == 400
    assert _tokens_to_max_t(30, 10, "step", 40) == 300
    assert _tokens_to_max_t(100, 10, "tokens_seen", 255) == 260
    assert _tokens_to_max_t(100, 10, "step", None) == 1000


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
    # The grid is listed weakest learning rate first; launched in a shuffled order, ASHA still
    # finds weak trials to stop, and each stopped trial keeps a checkpoint of where it stopped.
    assert "launch order (seed 0):" in out
    assert any(r["stopped_early"] for r in rows), "ASHA stopped no trial"
    for r in rows:
        run = experiment / r["run"]
        assert sorted(run.glob("checkpoint_*"))[-1].name == f"checkpoint_{r['steps']:07d}", r
    assert "concurrency: 2 trials at once: one trial holds 1 CPU, the cluster has 2 CPU" in out
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

    # A pickle planted in the copy's experiment state (as anyone who can write to a shared bucket
    # could) runs nothing under analyze or runs: Tune's record is read as plain JSON.
    from helpers import plant_pickles

    marker = plant_pickles(moved, tmp_path / "pwned")
    for command in (["analyze", str(moved)], ["runs", str(moved.parent)]):
        proc = subprocess.run([BIN / "raygpt", *command], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and not marker.exists(), (command, proc.stderr[-2000:])

    code, out, err = run_cli("train", "--config", str(experiment / "best_config.yaml"), "--address", ray_address,
                             "--set", f"run.storage_path={tmp_path / 'final'}")
    assert code == 0, err


@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(ray_address, data_dir, tmp_path, run_cli):
    # Ctrl-C (SIGINT): Tune stops the trials and saves the search; raygpt prints the analysis of
    # what finished, says how to continue and exits non-zero (130, as a shell reports SIGINT).
    import ray

    space = {"optim.peak_lr": {"grid": [0.001, 0.003, 0.01]}}
    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(search_raw(data_dir, tmp_path / "runs", space, name="exp",
                                             max_concurrent_trials=1, early_stopping=False)))
    with open(tmp_path / "driver.out", "w") as out_file, open(tmp_path / "driver.err", "w") as err_file:
        driver = subprocess.Popen([BIN / "raygpt", "tune", "--config", str(cfg), "--address", ray_address],
                                  stdout=out_file, stderr=err_file)
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
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=120) == 130
    said = (tmp_path / "driver.out").read_text() + (tmp_path / "driver.err").read_text()
    assert f"of 3 trials unfinished; continue it with `raygpt tune --resume {tmp_path / 'runs' / 'exp'}`" in said
    assert "Tuner.restore" not in said and "best trial" in said
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    done_before = {p.name: (p / "metrics.jsonl").read_text() for p in finished}
    # Pickles planted in the folder (tuner.pkl, the values Tune stores as pickles) run nothing:
    # the resume reads search.yaml and Tune's records as JSON, and starts a new Tuner.
    from helpers import plant_pickles

    marker = plant_pickles(experiment, tmp_path / "pwned")
    assert list(experiment.glob("*.pkl")), "the experiment folder holds pickles to plant"

    code, out, err = run_cli("tune", "--resume", str(experiment), "--address", ray_address)
    assert code == 0, err
    assert not marker.exists() and "trials finished," in out
    rows = analyze(str(experiment)).rows
    assert len(rows) == 3 and all(r["status"] == "TERMINATED" and r["steps"] == 12 for r in rows)
    for name, text in done_before.items():
        assert (experiment / name / "metrics.jsonl").read_text() == text  # not run again


@pytest.mark.slow
def test_a_trial_that_ended_but_is_recorded_running_reports_its_end_on_resume(ray_address, data_dir, tmp_path,
                                                                               run_cli):
    # The driver can die after a trial stored its last checkpoint and before Tune recorded it
    # TERMINATED (a loaded machine widens that window): the resume runs it again, its run is already
    # at its last step, and the trial must still report (Tune refuses a trial that ends silently).
    import json

    from raygpt.search.experiment_state import newest_state_file

    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(search_raw(data_dir, tmp_path / "runs", {"optim.peak_lr": {"grid": [0.003]}},
                                             name="exp", early_stopping=False)))
    code, out, err = run_cli("tune", "--config", str(cfg), "--address", ray_address)
    assert code == 0, err
    experiment = tmp_path / "runs" / "exp"
    state_file = Path(newest_state_file(str(experiment)))
    state = json.loads(state_file.read_text())
    for entry in state["trial_data"]:
        trial = json.loads(entry[0])
        trial["status"] = "RUNNING"
        entry[0] = json.dumps(trial)
    state_file.write_text(json.dumps(state))
    before = (experiment / "train-00000" / "metrics.jsonl").read_text()
    code, out, err = run_cli("tune", "--resume", str(experiment), "--address", ray_address)
    assert code == 0, err
    assert "0 of 1 trials finished, 1 to run" in out
    (row,) = analyze(str(experiment)).rows
    assert row["status"] == "TERMINATED" and row["steps"] == 12
    assert (experiment / "train-00000" / "metrics.jsonl").read_text() == before  # nothing trained again


@pytest.fixture
def cpu_hog():
    """A CPU-bound process beside the search, as any laptop has one."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_the_default_search_completes_on_a_loaded_machine(ray_address, tmp_path, run_cli, cpu_hog):
    """jobs/tune.yaml as shipped (the tiny model, 8 trials, 2 at a time, ASHA) on the prose
    corpus, with a CPU-bound process running beside it: every trial ends TERMINATED, none in
    ERROR, exit 0. (Trials used to wait on each other's CPU and fail after Ray Train's 60 s
    worker-group start timeout.) Shortened to 10 steps (a rung at 5) and a small final eval to keep
    the suite's time: what is tested is that 8 trials share 2 loaded CPUs."""
    data_dir = make_prose_corpus(tmp_path / "prose")
    code, out, err = run_cli("tune", "--config", str(JOBS / "tune.yaml"), "--address", ray_address,
                             "--set", f"data.dir={data_dir}", "--set", "data.source=null",
                             "--set", "train.max_steps=10", "--set", "train.final_eval_tokens=2048",
                             "--set", f"run.storage_path={tmp_path / 'runs'}", "--set", "tune.name=default")
    assert code == 0, err
    analysis = analyze(str(tmp_path / "runs" / "default"))
    assert len(analysis.rows) == 8 and all(r["status"] == "TERMINATED" for r in analysis.rows)
    assert not analysis.errors and "ERROR" not in out


@pytest.mark.slow
def test_more_trials_than_fit_queue_and_all_finish(ray_address, data_dir, tmp_path, run_cli):
    """2 workers a trial on 2 CPUs: one trial at a time, whatever max_concurrent_trials asks."""
    raw = search_raw(data_dir, tmp_path / "runs", {"optim.peak_lr": {"grid": [0.005, 0.01]}},
                     name="queue", max_concurrent_trials=4, early_stopping=False)
    raw["run"]["num_workers"], raw["train"]["max_steps"] = 2, 6
    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    code, out, err = run_cli("tune", "--config", str(cfg), "--address", ray_address)
    assert code == 0, err
    assert ("concurrency: max_concurrent_trials 4 capped to 1: one trial holds 2 CPU, "
            "the cluster has 2 CPU") in out
    rows = analyze(str(tmp_path / "runs" / "queue")).rows
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["steps"] == 6 for r in rows)


def fault_search(data_dir, tmp_path, **tune):
    """Two trials; the second fails once (an exception in the loop) after step 7."""
    raw = search_raw(data_dir, tmp_path / "runs", {"fault.crash_at_step": {"grid": [None, 7]}}, name="fault",
                     early_stopping=False, shuffle=False, **tune)
    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


@pytest.mark.slow
def test_a_failed_trial_is_retried_from_its_checkpoint(ray_address, data_dir, tmp_path, run_cli):
    code, out, err = run_cli("tune", "--config", str(fault_search(data_dir, tmp_path)), "--address", ray_address)
    assert code == 0, err
    analysis = analyze(str(tmp_path / "runs" / "fault"))
    assert all(r["status"] == "TERMINATED" and r["steps"] == 12 for r in analysis.rows) and not analysis.errors
    failed = next(r for r in analysis.rows if r["fault.crash_at_step"] == 7)
    events = read_events(str(tmp_path / "runs" / "fault" / failed["run"]))
    assert [e["restored_step"] for e in events] == [6]  # resumed from its checkpoint at step 6


@pytest.mark.slow
def test_a_trial_still_in_error_fails_the_search_naming_it_and_why(ray_address, data_dir, tmp_path, run_cli):
    code, out, err = run_cli("tune", "--config", str(fault_search(data_dir, tmp_path, max_failures=0)),
                             "--address", ray_address)
    assert code == 1
    assert "search failed: 1 of 2 trials ended in ERROR" in err
    failed = next(r for r in analyze(str(tmp_path / "runs" / "fault")).rows if r["status"] == "ERROR")
    assert (f"trial {failed['trial_id']} ERROR: "
            "raygpt.training.recovery.InjectedFault: injected fault after step 7 on rank 0") in out
    assert "best trial" in out  # the table and the analysis are printed first


@pytest.mark.slow
def test_optuna_suggests_valid_trials(ray_address, data_dir, tmp_path, run_cli):
    pytest.importorskip("optuna")
    space = {"optim.peak_lr": {"loguniform": [0.002, 0.03]}, "train.batch_size": {"grid": [4, 8]},
             "optim.initial_lr": {"grid": [0.001, 0.05]}}  # 0.05 is above every peak_lr: always refused
    raw = search_raw(data_dir, tmp_path / "runs", space, name="optuna", search_alg="optuna", num_samples=3)
    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    code, out, err = run_cli("tune", "--config", str(cfg), "--address", ray_address)
    assert code == 0, err
    analysis = analyze(str(tmp_path / "runs" / "optuna"))
    assert len(analysis.rows) == 3 and not analysis.errors
    assert all(r["optim.initial_lr"] == 0.001 and r["status"] == "TERMINATED" for r in analysis.rows)
    assert len({r["optim.peak_lr"] for r in analysis.rows}) == 3

    # The searcher's state exists only as a pickle (tuner.pkl), which raygpt never loads: an
    # Optuna search cannot resume, said in one line before anything starts.
    code, out, err = run_cli("tune", "--resume", str(tmp_path / "runs" / "optuna"), "--address", ray_address)
    assert code == 2 and err.count("\n") == 1, err
    assert "is an Optuna search" in err and "cannot resume without unpickling" in err


@pytest.mark.parametrize("max_t, eta", [(54, 3), (45, 3), (1000, 4), (12, 2)])
def test_the_smallest_hyperband_bracket_is_rays(max_t, eta):
    from ray.tune.schedulers import HyperBandScheduler

    from raygpt.search.tune import hyperband_smallest_bracket

    assert hyperband_smallest_bracket(max_t, eta) == HyperBandScheduler(max_t=max_t, reduction_factor=eta)._get_n0(1)


def test_the_search_curves_draw_every_trials_step_losses_beside_the_val_losses(tmp_path):
    pytest.importorskip("matplotlib")
    import struct

    from raygpt.search.analysis import Analysis, plot_curves

    settings = TuneSettings()
    rows = [{"trial_id": t, "optim.peak_lr": lr, "stopped_early": t == "b"} for t, lr in (("a", 0.01), ("b", 0.001))]
    curves = {t: [{"step": s, "val_loss": 10 - s / 8} for s in (0, 4, 8)] for t in "ab"}
    steps = {t: [{"step": s, "train_loss": 10 - s / 9} for s in range(1, 9)] for t in "ab"}

    def size(step_curves):
        path = tmp_path / f"{len(step_curves)}.png"
        plot_curves(Analysis(str(tmp_path), rows, ["optim.peak_lr"], curves, {}, settings, 0, 0,
                             step_curves=step_curves), str(path))
        return struct.unpack(">II", path.read_bytes()[16:24])

    assert size({}) == (800, 500)
    assert size(steps) == (1400, 500)


def test_analyze_out_never_replaces_a_users_files(tmp_path):
    from raygpt.search.analysis import Analysis, write_outputs

    user = tmp_path / "results"
    user.mkdir()
    (user / "trials.csv").write_text("my own table")
    (user / "best_config.yaml").write_text("mine: true")
    analysis = Analysis(str(tmp_path / "exp"), [], [], {}, {}, TuneSettings(), 0, 0)
    with pytest.raises(UserError, match=r"--out .*results holds files raygpt analyze did not write \(best_config"):
        write_outputs(analysis, str(user))
    assert (user / "trials.csv").read_text() == "my own table"
    with pytest.raises(UserError, match="--out is empty"):
        write_outputs(analysis, "")
    assert not (tmp_path / "exp").exists()  # refused before anything was written


def test_tune_check_validates_the_search_and_starts_nothing(data_dir, tmp_path, run_cli):
    from helpers import one_line_error

    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(search_raw(data_dir, tmp_path / "runs", name="exp")))
    code, out, err = run_cli("tune", "--check", "--config", str(cfg))
    assert code == 0, err
    assert "launch order (seed 0):" in out and "ok: experiment exp (new)" in out and "nothing started" in out
    assert not (tmp_path / "runs").exists()
    # ASHA asserted inside Ray on a grace period past every trial's end; now --check says so.
    err = one_line_error(run_cli, "tune", "--check", "--config", str(cfg), "--set", "tune.grace_period=1000")
    assert "tune.grace_period 1000 is past every trial's end (max_t 12 steps)" in err
