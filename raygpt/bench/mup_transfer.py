"""`raygpt bench mup-transfer`: learning-rate transfer across widths, from searches run with
`raygpt tune` itself (`jobs/mup-transfer.yaml`, once per parametrization).

Each search is a grid of model.embedding_dim x optim.peak_lr (powers of 2) with the same tokens
per trial and no early stopping. For each parametrization this reads every finished trial's final
val loss and prints, per width, the best grid lr; then how far apart (in grid steps) the widths'
best lrs are, and what the lr chosen at the base width costs at the largest width against that
width's own best. Under µP the best lr should stay put as the model widens; under the standard
parametrization it moves. Writes val loss vs lr per width, side by side (mup_transfer.png), and
the figures as JSON.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from raygpt.errors import UserError

WIDTH, LR = "model.embedding_dim", "optim.peak_lr"


def final_losses(experiment: str) -> tuple[str, dict[int, dict[float, float]]]:
    """(the search's parametrization, width -> lr -> final val loss) of the trials that ran to
    their end; the others are left out (a diverged or unfinished trial has no final loss)."""
    from raygpt.runs import read_search_file
    from raygpt.search.analysis import analyze

    analysis = analyze(experiment)
    if set(analysis.varied) != {WIDTH, LR}:
        raise UserError(f"{experiment}: a transfer search varies {WIDTH} and {LR}, this one "
                        f"{', '.join(analysis.varied)}")
    base = read_search_file(experiment)
    parametrization = (base.get("model") or {}).get("parametrization", "standard")
    table: dict[int, dict[float, float]] = {}
    for row in analysis.rows:
        if row["last_val_loss"] is not None and row["steps"] == row["total_steps"] and math.isfinite(
                row["last_val_loss"]):
            table.setdefault(int(row[WIDTH]), {})[float(row[LR])] = float(row["last_val_loss"])
    return parametrization, table


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


def format_table(parametrization: str, table: dict[int, dict[float, float]], summary: dict[str, Any]) -> str:
    lrs = sorted({lr for row in table.values() for lr in row})
    lines = [f"{parametrization}: final val loss per width (rows) and peak lr (columns; * the width's best)",
             "width  " + "  ".join(f"{'2^' + str(round(math.log2(lr))):>8}" for lr in lrs)]
    for width in sorted(table):
        row = table[width]
        cells = [(f"{row[lr]:.4f}" + ("*" if summary["best_lr"].get(str(width)) == lr else " ")) if lr in row
                 else "       -" for lr in lrs]
        lines.append(f"{width:>5}  " + "  ".join(f"{c:>8}" for c in cells))
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
    results: dict[str, dict[int, dict[float, float]]] = {}
    for experiment in experiments:
        parametrization, table = final_losses(experiment)
        if parametrization in results:
            raise UserError(f"two searches of parametrization {parametrization}: give one per parametrization")
        if not table:
            raise UserError(f"{experiment}: no trial ran to its end")
        results[parametrization] = table
    summaries = {p: summarize(t, base_width) for p, t in results.items()}
    for p, table in results.items():
        print(format_table(p, table, summaries[p]))
    os.makedirs(out, exist_ok=True)
    plot(results, os.path.join(out, "mup_transfer.png"))
    record = {"bench": "mup-transfer", "experiments": experiments, "base_width": base_width,
              "results": {p: {"table": {str(w): {repr(lr): v for lr, v in row.items()} for w, row in t.items()},
                              **summaries[p]} for p, t in results.items()}}
    with open(os.path.join(out, "mup_transfer.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {os.path.join(out, 'mup_transfer.png')}, {os.path.join(out, 'mup_transfer.json')}")
    return record
