"""The two figures of the recipe: train/val loss against tokens seen, and the lr schedule, drawn
into a run folder when the run ends."""

from __future__ import annotations

import os
from typing import Any

from raygpt import storage
from raygpt.config import Config
from raygpt.runs import PLOT_FILE, read_metrics
from raygpt.training.plan import StepPlan
from raygpt.training.schedule import lr_at


def plot_run(rows: list[dict[str, Any]], lrs: list[float], path: str) -> str:
    """Write a PNG of the loss curves (by tokens seen, epochs on a second axis) and the lr per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    tokens = [r["tokens_seen"] for r in rows]
    ax_loss.plot(tokens, [r["train_loss"] for r in rows], label="train loss")
    ax_loss.plot(tokens, [r["val_loss"] for r in rows], linestyle="-.", label="val loss")
    ax_loss.set_xlabel("tokens seen")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.legend(loc="upper right")
    if rows and max(r["epoch"] for r in rows) > 0:
        ax_epoch = ax_loss.twiny()
        ax_epoch.plot([r["epoch"] for r in rows], [r["val_loss"] for r in rows], alpha=0)
        ax_epoch.set_xlabel("epoch")
    ax_lr.plot(range(len(lrs)), lrs)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def lr_schedule(cfg: Config, plan: StepPlan) -> list[float]:
    return [lr_at(s, plan.total_steps, cfg.optim) for s in range(plan.total_steps)]


def write_plot(cfg: Config, plan: StepPlan, run_uri: str) -> str:
    rows = read_metrics(run_uri)
    target = storage.join(run_uri, PLOT_FILE)
    if storage.is_uri(run_uri):
        with storage.temporary_dir() as tmp:
            local = plot_run(rows, lr_schedule(cfg, plan), os.path.join(tmp, PLOT_FILE))
            with open(local, "rb") as f:
                fs, path = storage.filesystem(target)
                with fs.open_output_stream(path) as out:
                    out.write(f.read())
        return target
    return plot_run(rows, lr_schedule(cfg, plan), target)
