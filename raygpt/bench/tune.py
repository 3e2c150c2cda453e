"""`raygpt bench tune`: the same 16-configuration grid run to the end and with early stopping,
in one sitting: tokens trained, wall time, per-trial start-up and overhead, the winners."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

from raygpt.data.prepare import prepare_local


def _tune_bench_search(storage: str, data_dir: str) -> dict:
    """16 configurations (peak_lr x batch_size x warmup_steps of the original recipe's grid), a
    small GPT, 54 steps each; ASHA with reduction factor 3 (rungs at 6, 18, 54 steps). Each report
    evaluates 32 spread windows per split, a trial's last 256 val windows (the same for every trial)."""
    return {
        "schema_version": 1,
        "model": {"embedding_dim": 64, "num_layers": 2, "num_heads": 2, "context_len": 64, "dropout": 0.0},
        "data": {"dir": data_dir},
        "train": {"batch_size": 8, "max_steps": 54, "eval_freq": 6, "save_freq": 54, "seed": 123,
                  "eval_tokens": 2048, "final_eval_tokens": 16384},
        "optim": {"peak_lr": 0.003, "initial_lr": 0.0001, "min_lr": 0.0001, "warmup_steps": 2},
        "run": {"storage_path": storage, "num_workers": 1, "num_to_keep": 1},
        "search": {"optim.peak_lr": {"grid": [0.0003, 0.001, 0.003, 0.01]}, "train.batch_size": {"grid": [8, 16]},
                   "optim.warmup_steps": {"grid": [2, 10]}},
        "tune": {"metric": "val_loss", "time_attr": "step", "grace_period": 6, "reduction_factor": 3,
                 "max_concurrent_trials": 2},
    }


# name -> (tune settings): the full grid, ASHA with trials run in the Tune trial, ASHA with a
# TorchTrainer per trial (how every trial ran before; its start-up is the overhead cut), ASHA on
# the grid in its listed order (weakest learning rate first), synchronous HyperBand.
TUNE_ARMS = {
    "full_grid": {"early_stopping": False},
    "asha": {"early_stopping": True},
    "asha_trainer": {"early_stopping": True, "in_process": False},
    "asha_unshuffled": {"early_stopping": True, "shuffle": False},
    "hyperband": {"early_stopping": True, "scheduler": "hyperband"},
}


def _trial_timings(experiment: str, analysis) -> dict:
    """Seconds per trial beyond training: `startup` from the trial's start to its loop's first
    report (Tune's time_total_s then, less the step-0 eval), and `overhead` from the wall clock:
    (wall x trials at once - the loops' own time) / trials, which also counts actor start,
    scheduling and teardown."""
    from ray.tune import ExperimentAnalysis

    ea = ExperimentAnalysis(experiment)
    startups = []
    for trial in ea.trials:
        df = ea.trial_dataframes.get(trial.trial_id)
        rows = analysis.curves.get(trial.trial_id) or []
        if df is not None and len(df) and rows:
            startups.append(float(df["time_total_s"].iloc[0]) - rows[0]["elapsed"])
    loop_seconds = sum(rows[-1]["elapsed"] for rows in analysis.curves.values() if rows)
    return {"startup_s": round(statistics.mean(startups), 1) if startups else None, "loop_s": round(loop_seconds, 1)}


def bench_tune(address: str | None = None, data_dir: str = "data/stdlib", arms: list[str] | None = None) -> dict:
    """The same 16-configuration grid run to the end, then with ASHA (trials in the Tune trial,
    then as TorchTrainers), in one sitting: tokens trained, wall time, per-trial start-up and
    overhead, the winners and the gap between their val losses."""
    from raygpt.search.analysis import analyze
    from raygpt.search.spec import parse_search
    from raygpt.search.tune import run_search

    arms = arms or list(TUNE_ARMS)
    if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
        prepare_local(source="stdlib", out=data_dir)
    out: dict = {"benchmark": "tune", "data": data_dir, "configurations": 16, "reduction_factor": 3}
    with tempfile.TemporaryDirectory(prefix="raygpt-bench-tune-") as storage:
        raw = _tune_bench_search(storage, data_dir)
        for label in arms:
            raw["tune"] = {**_tune_bench_search(storage, data_dir)["tune"], **TUNE_ARMS[label], "name": label}
            start = time.perf_counter()
            experiment = run_search(parse_search(dict(raw)), address=address, log=lambda *a: None)
            seconds = time.perf_counter() - start
            a = analyze(experiment)
            best = a.rows[0]
            timings = _trial_timings(experiment, a)
            concurrency = raw["tune"]["max_concurrent_trials"]
            out[label] = {"tokens": a.tokens_trained, "tokens_to_max_t": a.tokens_full_grid,
                          "wall_s": round(seconds, 1),
                          "best_val_loss": round(best["best_val_loss"], 4), "best": {k: best[k] for k in a.varied},
                          "stopped_early": sum(r["stopped_early"] for r in a.rows), "errors": len(a.errors),
                          "startup_s_per_trial": timings["startup_s"],
                          "overhead_s_per_trial": round((seconds * concurrency - timings["loop_s"]) / len(a.rows), 1)}
            # a long sitting: figures as they come
            print(f"bench tune: {label} done: {json.dumps(out[label])}", flush=True)
    print(f"tune benchmark: 16 configurations, 1 worker each, 2 at a time, ASHA reduction factor 3, data {data_dir}")
    for label in arms:
        r = out[label]
        print(f"  {label:<13} tokens {r['tokens']:>10,}  wall {r['wall_s']:>7.1f} s"
              f"  start-up {r['startup_s_per_trial']} s"
              f"  overhead {r['overhead_s_per_trial']} s/trial  best val {r['best_val_loss']:.4f}"
              f"  stopped early {r['stopped_early']:>2}  errors {r['errors']}  best {r['best']}")
    if "full_grid" in out:
        full = out["full_grid"]
        for label in (a for a in arms if a != "full_grid"):
            r = out[label]
            r["token_ratio"] = round(r["tokens"] / full["tokens"], 3)
            r["same_best"] = r["best"] == full["best"]
            r["val_loss_gap"] = round((r["best_val_loss"] - full["best_val_loss"]) / full["best_val_loss"], 4)
            print(f"  {label}: tokens {r['token_ratio']:.2f} of the full grid's (goal <= 0.40); same winner: "
                  f"{r['same_best']}; winner's val loss {r['val_loss_gap']:+.2%} "
                  "vs the full grid's best (goal within 1%)")
    print(json.dumps(out))
    return out
