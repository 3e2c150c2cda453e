"""The recipe's figures, drawn into a run folder when the run ends: train/val loss against tokens
seen (with every logged step's train loss), the lr schedule, and the gradient norm per step."""

from __future__ import annotations

import os
from typing import Any

from raygpt import storage
from raygpt.config import Config
from raygpt.runs import PLOT_FILE, read_metrics, read_steps
from raygpt.training.plan import StepPlan
from raygpt.training.schedule import lr_at


def smoothed(values: list[float], span: int) -> list[float]:
    """An exponential moving average with the given span, bias-corrected at the start."""
    alpha, out, avg, weight = 2.0 / (span + 1), [], 0.0, 0.0
    for v in values:
        avg, weight = (1 - alpha) * avg + alpha * v, (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def plot_run(rows: list[dict[str, Any]], lrs: list[float], path: str,
             steps: list[dict[str, Any]] = ()) -> str:
    """Write a PNG of the loss curves by tokens seen (every logged step's train loss, light, and
    smoothed, under the evals' train and val loss; epochs on a second axis), the lr per step and,
    with per-step rows, the gradient norm per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if steps else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    ax_loss, ax_lr = axes[0], axes[1]
    if steps:
        step_tokens, step_loss = [r["tokens_seen"] for r in steps], [r["train_loss"] for r in steps]
        ax_loss.plot(step_tokens, step_loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss (step)")
        ax_loss.plot(step_tokens, smoothed(step_loss, max(5, len(steps) // 50)), color="tab:blue", linewidth=1.2,
                     label="train loss (step, smoothed)")
    tokens = [r["tokens_seen"] for r in rows]
    ax_loss.plot(tokens, [r["train_loss"] for r in rows], marker="o", markersize=3, color="tab:green",
                 label="train loss (eval)")
    ax_loss.plot(tokens, [r["val_loss"] for r in rows], linestyle="-.", marker="o", markersize=3,
                 color="tab:orange", label="val loss")
    ax_loss.set_xlabel("tokens seen")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.legend(loc="upper right", fontsize=8)
    if rows and max(r["epoch"] for r in rows) > 0:
        ax_epoch = ax_loss.twiny()
        ax_epoch.plot([r["epoch"] for r in rows], [r["val_loss"] for r in rows], alpha=0)
        ax_epoch.set_xlabel("epoch")
    ax_lr.plot(range(len(lrs)), lrs)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    if steps:
        axes[2].plot([r["step"] for r in steps], [r["grad_norm"] for r in steps], linewidth=0.8)
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("gradient norm (before clipping)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def lr_schedule(cfg: Config, plan: StepPlan) -> list[float]:
    return [lr_at(s, plan.total_steps, cfg.optim) for s in range(plan.total_steps)]


def write_plot(cfg: Config, plan: StepPlan, run_uri: str) -> str:
    rows, steps = read_metrics(run_uri), read_steps(run_uri)
    target = storage.join(run_uri, PLOT_FILE)
    if storage.is_uri(run_uri):
        with storage.temporary_dir() as tmp:
            local = plot_run(rows, lr_schedule(cfg, plan), os.path.join(tmp, PLOT_FILE), steps)
            with open(local, "rb") as f:
                fs, path = storage.filesystem(target)
                with fs.open_output_stream(path) as out:
                    out.write(f.read())
        return target
    return plot_run(rows, lr_schedule(cfg, plan), target, steps)
