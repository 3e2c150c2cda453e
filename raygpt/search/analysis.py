"""Result analysis of a search: a table of trials, the best config as YAML, curves, compute saved.

It reads the experiment folder's own files only, as data: `search.yaml`, Tune's trial records
(`raygpt.search.experiment_state`: plain JSON, never unpickled) and each trial's Train run
folder (`train-<launch index>`: its metrics log and checkpoints). Every path it writes is relative
to the experiment folder, so a finished experiment copied off a cluster's storage still analyses
and its checkpoints still load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import yaml

from raygpt import runs, storage
from raygpt.errors import UserError
from raygpt.runs import best_checkpoint, is_report_row, is_step_row, read_log, read_search_file
from raygpt.search.experiment_state import TrialRecord, error_text, read_trials
from raygpt.search.spec import (
    TuneSettings,
    rung_index,
    search_base,
    settings_from_dict,
    trial_config,
)

BEST_CONFIG = "best_config.yaml"
ANALYSIS_MARKER = ".raygpt-analysis"  # in an --out folder: analyze wrote it, and may again
CURVES = "val_loss_curves.png"


@dataclass
class Analysis:
    experiment_dir: str
    rows: list[dict[str, Any]]  # one per trial, best val_loss first
    varied: list[str]  # the searched keys
    curves: dict[str, list[dict[str, Any]]]  # trial id -> metric rows
    configs: dict[str, dict[str, Any]]  # trial id -> its complete training config
    settings: TuneSettings
    tokens_trained: int
    tokens_full_grid: int  # every launched trial run to max_t
    concurrency: str = ""  # how many trials ran at once, and why
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # trial id -> one-line cause
    step_curves: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)  # trial id -> step rows

    @property
    def failed(self) -> bool:
        return bool(self.errors)


def analyze(experiment_dir: str) -> Analysis:
    experiment_dir = storage.resolve_storage(experiment_dir).rstrip("/")
    search = read_search_file(experiment_dir)
    settings = settings_from_dict(search["tune"], search_base(search))
    launch = search.get("launch") or {}
    max_t = launch.get("max_t")
    planned = {_key(o): t for o, t in zip(launch.get("order") or [], launch.get("total_steps") or [])}
    varied = list(search["search"])
    trials = read_trials(experiment_dir)
    rows, curves, configs, errors, step_curves = [], {}, {}, {}, {}
    trained = full = 0
    base = search_base(search)
    for trial in trials:
        hp = trial.hp
        cfg = trial_config(base, hp).to_dict()
        run_dir = storage.join(experiment_dir, trial.run)
        log = read_log(run_dir)
        metrics = [r for r in log if is_report_row(r) and "val_loss" in r]
        curves[trial.trial_id] = metrics
        step_curves[trial.trial_id] = [r for r in log if is_step_row(r)]
        configs[trial.trial_id] = cfg
        tokens_per_step = cfg["train"]["batch_size"] * cfg["model"]["context_len"]
        total_steps = metrics[-1]["total_steps"] if metrics else planned.get(_key(hp))
        last = metrics[-1] if metrics else {}
        steps = last.get("step", 0)
        tokens = last.get("tokens_seen", 0)
        trained += tokens
        full += _tokens_to_max_t(total_steps or 0, tokens_per_step, settings.time_attr, max_t)
        if trial.status == "ERROR":
            errors[trial.trial_id] = _error_cause(trial)
        finished_early = trial.status == "TERMINATED" and total_steps is not None and steps < total_steps
        best_uri, _ = best_checkpoint(run_dir)
        time_value = steps if settings.time_attr == "step" else tokens
        rows.append({
            "trial_id": trial.trial_id,
            "run": trial.run,
            **{key: hp.get(key) for key in varied},
            "best_val_loss": min((r["val_loss"] for r in metrics), default=None),
            "last_val_loss": last.get("val_loss"),
            **_ranked_metric(log, settings),
            "steps": steps,
            "total_steps": total_steps,
            "tokens": tokens,
            "stopped_early": finished_early,
            "rung": rung_index(time_value, settings) if finished_early else None,
            "status": trial.status,
            "error": errors.get(trial.trial_id),
            "best_checkpoint": os.path.relpath(best_uri, experiment_dir) if best_uri and not storage.is_uri(best_uri)
            else (best_uri[len(experiment_dir) + 1:] if best_uri else None),
        })
    best = f"best_{settings.metric}" if settings.metric != "val_loss" and any(
        f"best_{settings.metric}" in r for r in rows) else "best_val_loss"
    sign = -1 if best != "best_val_loss" and settings.mode == "max" else 1
    # best first by the search's own metric (tune.metric and tune.mode); trials without it last
    rows.sort(key=lambda r: (r.get(best) is None, sign * r[best] if r.get(best) is not None else 0))
    return Analysis(experiment_dir, rows, varied, curves, configs, settings, trained, full,
                    launch.get("concurrency", ""), errors, step_curves)


def _ranked_metric(log: list[dict[str, Any]], settings: TuneSettings) -> dict[str, Any]:
    """best_<metric> and last_<metric> of a search that ranks on a metric other than val loss (a
    train.evals score, tokens/s, ...), from the report rows where it was measured."""
    metric = settings.metric
    if metric == "val_loss":
        return {}
    values = [r[metric] for r in log if is_report_row(r) and r.get(metric) is not None]
    pick = max if settings.mode == "max" else min
    return {f"best_{metric}": pick(values, default=None), f"last_{metric}": values[-1] if values else None}


def _key(overrides: dict[str, Any]) -> str:
    return json.dumps(overrides, sort_keys=True)


def _tokens_to_max_t(total_steps: int, tokens_per_step: int, time_attr: str, max_t: float | None) -> int:
    """The tokens a trial trains when nothing stops it before max_t (ASHA's last rung)."""
    if max_t is None:
        return total_steps * tokens_per_step
    if time_attr == "step":
        return min(total_steps, math.ceil(max_t)) * tokens_per_step
    return min(total_steps, math.ceil(max_t / tokens_per_step)) * tokens_per_step


def _error_cause(trial: TrialRecord) -> str:
    """The one line of a trial's error that says what went wrong (the last `Type: message` line
    of the traceback Tune saved), with where the whole traceback is."""
    text = error_text(trial)  # "" when the error file is gone or unreadable: said, not a failure
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    causes = [line for line in lines
              if not line.startswith(("File ", "^", "~", "During handling", "The above", "Traceback"))
              and ": " in line and line.split(":", 1)[0].replace(".", "").replace("_", "").isalnum()]
    cause = causes[-1] if causes else (lines[-1] if lines else "no error text saved")
    return f"{cause} (traceback: {trial.error_file})" if trial.error_file else cause


def best_config(analysis: Analysis) -> dict[str, Any]:
    """The best trial's complete training config, as `raygpt train --config` takes it."""
    cfg = analysis.configs[analysis.rows[0]["trial_id"]]
    cfg["run"]["name"] = None
    return cfg


OUTPUTS = {"csv": runs.TRIALS_CSV, "parquet": runs.TRIALS_PARQUET, "best_config": BEST_CONFIG, "curves": CURVES}


def write_outputs(analysis: Analysis, out_dir: str | None = None) -> dict[str, str]:
    """trials.csv, trials.parquet, best_config.yaml and val_loss_curves.png into the experiment
    folder, local or on storage (each file whole, as every small file on storage is written),
    and into the local folder `out_dir` too when given; returns the experiment folder's paths."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if out_dir is not None and storage.is_uri(out_dir):
        raise UserError(f"--out must be a local folder, got {out_dir}; the experiment folder gets the analysis anyway")
    if out_dir is not None:
        storage.check_output_folder(out_dir, (*OUTPUTS.values(), ANALYSIS_MARKER), ANALYSIS_MARKER, "raygpt analyze")
    with storage.temporary_dir() as tmp:
        local = {key: os.path.join(tmp, name) for key, name in OUTPUTS.items()}
        table = pa.Table.from_pylist(analysis.rows)
        pacsv.write_csv(table, local["csv"])
        pq.write_table(table, local["parquet"])
        with open(local["best_config"], "w") as f:
            f.write("# The best trial of the search; train it as is with: raygpt train --config best_config.yaml\n")
            yaml.safe_dump(best_config(analysis), f, sort_keys=False)
        plot_curves(analysis, local["curves"])
        for folder in [analysis.experiment_dir] + ([storage.resolve_storage(out_dir)] if out_dir else []):
            for key, name in OUTPUTS.items():  # each written under a temporary name and renamed
                with open(local[key], "rb") as f:
                    storage.write_bytes(storage.join(folder, name), f.read())
        if out_dir:
            storage.write_text(storage.join(storage.resolve_storage(out_dir), ANALYSIS_MARKER),
                               json.dumps({"written_by": "raygpt analyze", "experiment": analysis.experiment_dir}))
    return {key: storage.join(analysis.experiment_dir, name) for key, name in OUTPUTS.items()}


def plot_curves(analysis: Analysis, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raygpt.training.plots import smoothed

    attr = analysis.settings.time_attr
    with_steps = any(analysis.step_curves.get(r["trial_id"]) for r in analysis.rows)
    fig, axes = plt.subplots(1, 2 if with_steps else 1, figsize=(14 if with_steps else 8, 5), squeeze=False)
    ax = axes[0][0]
    for row in analysis.rows:
        metrics = analysis.curves[row["trial_id"]]
        if not metrics:
            continue
        xs, ys = [m[attr] for m in metrics], [m["val_loss"] for m in metrics]
        label = ", ".join(f"{k.split('.')[-1]}={row[k]:.3g}" if isinstance(row[k], float)
                          else f"{k.split('.')[-1]}={row[k]}"
                          for k in analysis.varied)
        (line,) = ax.plot(xs, ys, label=label, alpha=0.85)
        if row["stopped_early"]:
            ax.plot(xs[-1], ys[-1], marker="x", markersize=9, color=line.get_color())
        steps = analysis.step_curves.get(row["trial_id"]) or []
        if with_steps and steps:
            losses = [s["train_loss"] for s in steps]
            axes[0][1].plot([s[attr] for s in steps], smoothed(losses, max(3, len(steps) // 50)),
                            color=line.get_color(), alpha=0.85, linewidth=1.0)
    ax.set_xlabel(attr.replace("_", " "))
    ax.set_ylabel("val loss")
    ax.set_title("val loss per trial (x: stopped early by ASHA)")
    ax.legend(fontsize=7, loc="upper right")
    if with_steps:
        axes[0][1].set_xlabel(attr.replace("_", " "))
        axes[0][1].set_ylabel("train loss per step (smoothed)")
        axes[0][1].set_title("train loss of every logged step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_trials_table(analysis: Analysis) -> str:
    ranked = [k for k in (f"best_{analysis.settings.metric}", f"last_{analysis.settings.metric}")
              if analysis.rows and k in analysis.rows[0] and k not in ("best_val_loss", "last_val_loss")]
    keys = ["trial_id", *analysis.varied, *ranked, "best_val_loss", "last_val_loss", "steps", "tokens",
            "stopped_early", "rung", "status", "best_checkpoint"]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[cell(r[k]) for k in keys] for r in analysis.rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    full = analysis.tokens_full_grid
    saved = 1 - analysis.tokens_trained / full if full else 0.0
    lines.append(f"tokens trained: {analysis.tokens_trained:,} of {full:,} for every trial run to max_t "
                 f"({analysis.tokens_trained / max(full, 1):.0%}; early stopping saved {saved:.0%})")
    if analysis.concurrency:
        lines.append(f"concurrency: {analysis.concurrency}")
    for trial_id, cause in analysis.errors.items():
        lines.append(f"trial {trial_id} ERROR: {cause}")
    return "\n".join(lines)


def report_search(experiment_dir: str, out_dir: str | None = None, log=print) -> Analysis:
    """Analyse, print the table, write the outputs: what `raygpt analyze` does."""
    analysis = analyze(experiment_dir)
    if not analysis.rows:
        raise UserError(f"experiment {experiment_dir} has no trials")
    log(format_trials_table(analysis))
    paths = write_outputs(analysis, out_dir)
    best, metric = analysis.rows[0], analysis.settings.metric
    if best["best_val_loss"] is None:
        log("no trial reported a val loss")
    elif best.get(f"best_{metric}") is not None and metric != "val_loss":
        log(f"best trial {best['trial_id']}: {metric} {best[f'best_{metric}']:.4f} (val loss "
            f"{best['best_val_loss']:.4f}), checkpoint {best['best_checkpoint']}")
    else:
        log(f"best trial {best['trial_id']}: val loss {best['best_val_loss']:.4f}, "
            f"checkpoint {best['best_checkpoint']}")
    log(f"wrote {', '.join(paths.values())}" + (f" (and a copy in {out_dir})" if out_dir else ""))
    return analysis
