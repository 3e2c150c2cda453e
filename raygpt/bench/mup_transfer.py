"""`raygpt bench mup-transfer`: learning-rate transfer across widths, from searches run with
`raygpt tune` itself (`jobs/mup-transfer.yaml`, once per parametrization).

Each search is a grid of model.embedding_dim x optim.peak_lr (powers of 2) with the same tokens
per trial and no early stopping. For each parametrization this reads every finished trial's final
val loss and prints, per width, the best grid lr; then how far apart (in grid steps) the widths'
best lrs are, and what the lr chosen at the base width costs at the largest width against that
width's own best. Under µP the best lr should stay put as the model widens; under the standard
parametrization it moves. Several searches of one parametrization are pooled, and a search may
vary train.seed too: a grid point's loss is then the mean of its runs. Writes val loss vs lr per
width, side by side (mup_transfer.png), and the figures as JSON.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from raygpt.errors import UserError

WIDTH, LR, SEED = "model.embedding_dim", "optim.peak_lr", "train.seed"


def final_losses(experiment: str) -> tuple[str, dict[int, dict[float, list[float]]], int]:
    """(the search's parametrization, width -> lr -> the final val loss of each run, the steps of a
    run) for the trials that ran to their end; the others are left out (a diverged or unfinished
    trial has no final loss). A search may also vary train.seed: repeats of a grid point."""
    from raygpt.runs import read_search_file
    from raygpt.search.analysis import analyze

    analysis = analyze(experiment)
    if not {WIDTH, LR} <= set(analysis.varied) <= {WIDTH, LR, SEED}:
        raise UserError(f"{experiment}: a transfer search varies {WIDTH} and {LR} (and optionally {SEED}), this one "
                        f"{', '.join(analysis.varied)}")
    base = read_search_file(experiment)
    parametrization = (base.get("model") or {}).get("parametrization", "standard")
    table: dict[int, dict[float, list[float]]] = {}
    steps = {row["total_steps"] for row in analysis.rows}
    if len(steps) > 1:
        raise UserError(f"{experiment}: its trials run different numbers of steps ({sorted(steps)}); a transfer "
                        "search gives every trial the same tokens")
    for row in analysis.rows:
        if row["last_val_loss"] is not None and row["steps"] == row["total_steps"] and math.isfinite(
                row["last_val_loss"]):
            table.setdefault(int(row[WIDTH]), {}).setdefault(float(row[LR]), []).append(float(row["last_val_loss"]))
    return parametrization, table, steps.pop() if steps else 0


def mean_losses(runs: dict[int, dict[float, list[float]]]) -> dict[int, dict[float, float]]:
    """width -> lr -> the mean final val loss over a grid point's runs (its seeds)."""
    return {w: {lr: sum(v) / len(v) for lr, v in lrs.items()} for w, lrs in runs.items()}


def summarize(table: dict[int, dict[float, float]], base_width: int) -> dict[str, Any]:
    """Best lr per width, their spread in grid steps (powers of 2), and the base width's lr used at
    the largest width: its loss there against that width's best, in percent."""
    best = {w: min(lrs, key=lrs.get) for w, lrs in table.items() if lrs}
    steps = [round(math.log2(lr)) for lr in best.values()]
    out: dict[str, Any] = {"best_lr": {str(w): lr for w, lr in sorted(best.items())},
                           "best_val_loss": {str(w): table[w][lr] for w, lr in sorted(best.items())},
                           "spread_grid_steps": max(steps) - min(steps) if steps else None}
    widest = max(table) if table else None
    if base_width in best and widest is not None and best[base_width] in table[widest]:
        chosen = table[widest][best[base_width]]
        out["transfer"] = {"from_width": base_width, "to_width": widest, "lr": best[base_width],
                           "val_loss": chosen, "best_val_loss": table[widest][best[widest]],
                           "gap_percent": (chosen / table[widest][best[widest]] - 1) * 100}
    return out


def format_table(parametrization: str, table: dict[int, dict[float, float]], summary: dict[str, Any],
                 runs: dict[int, dict[float, int]] | None = None) -> str:
    """The width x lr table; where grid points had more than one run (seeds), the loss is their
    mean and a second table gives the number of runs."""
    lrs = sorted({lr for row in table.values() for lr in row})
    header = "width  " + "  ".join(f"{'2^' + str(round(math.log2(lr))):>8}" for lr in lrs)
    repeated = runs is not None and any(n > 1 for row in runs.values() for n in row.values())
    lines = [f"{parametrization}: final val loss{' (mean over runs)' if repeated else ''} per width (rows) and "
             "peak lr (columns; * the width's best)", header]
    for width in sorted(table):
        row = table[width]
        cells = [(f"{row[lr]:.4f}" + ("*" if summary["best_lr"].get(str(width)) == lr else " ")) if lr in row
                 else "       -" for lr in lrs]
        lines.append(f"{width:>5}  " + "  ".join(f"{c:>8}" for c in cells))
    if repeated:
        lines += [f"{parametrization}: runs per grid point (seeds)", header]
        lines += [f"{width:>5}  " + "  ".join(f"{runs[width].get(lr, 0):>8}" for lr in lrs) for width in sorted(runs)]
    lines.append(f"best lr spread over widths: {summary['spread_grid_steps']} grid step(s)")
    t = summary.get("transfer")
    if t:
        lines.append(f"lr chosen at width {t['from_width']} (2^{round(math.log2(t['lr']))}) at width {t['to_width']}: "
                     f"val loss {t['val_loss']:.4f} vs its best {t['best_val_loss']:.4f} ({t['gap_percent']:+.2f}%)")
    return "\n".join(lines)


def plot(results: dict[str, dict[int, dict[float, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), sharey=True, squeeze=False)
    for ax, (parametrization, table) in zip(axes[0], results.items()):
        for width in sorted(table):
            lrs = sorted(table[width])
            (line,) = ax.plot(lrs, [table[width][lr] for lr in lrs], marker="o", label=f"width {width}")
            best = min(lrs, key=table[width].get)
            ax.plot([best], [table[width][best]], marker="*", markersize=14, color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("peak lr")
        ax.set_title(parametrization)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("final val loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_mup_transfer(experiments: list[str], base_width: int = 128, out: str = "mup_transfer") -> dict[str, Any]:
    """Searches of the same parametrization (e.g. a grid, then more seeds of some of its points)
    are pooled: each grid point's loss is the mean of its runs."""
    if len(set(experiments)) < len(experiments):
        raise UserError("an experiment is given twice: its runs would count twice")
    pooled: dict[str, dict[int, dict[float, list[float]]]] = {}
    steps: dict[str, int] = {}
    for experiment in experiments:
        parametrization, runs, total_steps = final_losses(experiment)
        if not runs:
            raise UserError(f"{experiment}: no trial ran to its end")
        if steps.setdefault(parametrization, total_steps) != total_steps:
            raise UserError(f"{experiment}: its trials run {total_steps} steps, another {parametrization} search's "
                            f"{steps[parametrization]}; pool only searches of the same length")
        for width, lrs in runs.items():
            for lr, losses in lrs.items():
                pooled.setdefault(parametrization, {}).setdefault(width, {}).setdefault(lr, []).extend(losses)
    results = {p: mean_losses(runs) for p, runs in pooled.items()}
    counts = {p: {w: {lr: len(v) for lr, v in lrs.items()} for w, lrs in runs.items()} for p, runs in pooled.items()}
    summaries = {p: summarize(t, base_width) for p, t in results.items()}
    for p, table in results.items():
        print(format_table(p, table, summaries[p], counts[p]))
    os.makedirs(out, exist_ok=True)
    plot(results, os.path.join(out, "mup_transfer.png"))
    record = {"bench": "mup-transfer", "experiments": experiments, "base_width": base_width,
              "results": {p: {"table": {str(w): {repr(lr): v for lr, v in row.items()} for w, row in t.items()},
                              "runs": {str(w): {repr(lr): n for lr, n in row.items()} for w, row in counts[p].items()},
                              **summaries[p]} for p, t in results.items()}}
    with open(os.path.join(out, "mup_transfer.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {os.path.join(out, 'mup_transfer.png')}, {os.path.join(out, 'mup_transfer.json')}")
    return record
