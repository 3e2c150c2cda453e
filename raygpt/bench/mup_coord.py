"""`raygpt bench mup-coord`: the coordinate check of µP (Tensor Programs V, and the `mup`
package's `get_coord_data`): train models of growing width for a few AdamW steps at the same
learning rate and record the mean |activation| of each layer type at each step. Under the
standard parametrization the activations after a few steps grow with the width (the updates of
a width-d matrix add up over d coordinates); under µP they stay flat, which is what lets a
learning rate found at a small width hold at a large one.

Random token ids (seeded) stand in for data: the check is about how updates scale with width,
not what the model learns. Prints a table per parametrization, writes the PNG and one JSON line.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F

from raygpt.config import OptimConfig
from raygpt.errors import UserError
from raygpt.model import GPTModel
from raygpt.training.loop import build_optimizer

LAYERS = ("embedding", "attention", "mlp", "block", "logits")
HEAD_DIM = 32  # heads = width / 32: the attention scale is about d_head, kept fixed across widths


def coord_data(parametrization: str, width: int, *, steps: int, lr: float, base_width: int, layers: int = 2,
               context: int = 64, batch: int = 8, seed: int = 0) -> list[dict[str, float]]:
    """Per step (before it is applied, step 0 the initial model): mean |activation| of each layer
    type, averaged over the blocks."""
    torch.manual_seed(seed)
    model = GPTModel(embedding_dim=width, num_layers=layers, num_heads=max(1, width // HEAD_DIM), context_len=context,
                     dropout=0.0, parametrization=parametrization, mup_base_width=base_width)
    optimizer = build_optimizer(model, OptimConfig(peak_lr=lr, weight_decay=0.0))
    for group in optimizer.param_groups:  # as train_step sets it: µP's groups at lr_scale x lr
        group["lr"] = lr * group.get("lr_scale", 1.0)
    seen: dict[str, list[float]] = {}

    def record(name: str):
        return lambda module, args, out: seen.setdefault(name, []).append(out.detach().abs().mean().item())

    hooks = [model.drop_emb.register_forward_hook(record("embedding"))]
    for block in model.trf_blocks:
        hooks += [block.attn.register_forward_hook(record("attention")), block.ff.register_forward_hook(record("mlp")),
                  block.register_forward_hook(record("block"))]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.cfg.vocabulary_size, (batch, context + 1), generator=generator)
    rows = []
    for _ in range(steps + 1):
        seen.clear()
        logits = model(x[:, :-1])
        row = {name: sum(values) / len(values) for name, values in seen.items()}
        row["logits"] = logits.detach().abs().mean().item()
        rows.append(row)
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for hook in hooks:
        hook.remove()
    return rows


def bench_mup_coord(widths: list[int] | None = None, steps: int = 4, lr: float = 0.01, base_width: int = 128,
                    out: str = "mup_coord", log=print) -> dict[str, Any]:
    widths = sorted(widths or [64, 128, 256, 512, 1024])
    if any(w % HEAD_DIM or w <= 0 for w in widths):
        raise UserError(f"--widths must be positive multiples of {HEAD_DIM} (heads of {HEAD_DIM}), got {widths}")
    if steps < 1 or not lr > 0:
        raise UserError(f"--steps must be >= 1 and --lr > 0, got {steps} and {lr}")
    data = {p: {w: coord_data(p, w, steps=steps, lr=lr, base_width=base_width) for w in widths}
            for p in ("standard", "mup")}
    result: dict[str, Any] = {"benchmark": "mup-coord", "widths": widths, "steps": steps, "lr": lr,
                              "base_width": base_width, "last_step": {}, "growth": {}}
    for p, by_width in data.items():
        log(f"{p}: mean |activation| after {steps} steps at lr {lr:g} (base width {base_width})")
        log("  " + f"{'width':>6}" + "".join(f"{name:>12}" for name in LAYERS))
        for w in widths:
            log("  " + f"{w:>6}" + "".join(f"{by_width[w][-1][name]:>12.4g}" for name in LAYERS))
        last = {name: [by_width[w][-1][name] for w in widths] for name in LAYERS}
        result["last_step"][p] = last
        # How much each layer type grew from the smallest to the largest width: ~1 is flat.
        result["growth"][p] = {name: values[-1] / values[0] for name, values in last.items()}
        log("  growth, widest / narrowest: " + ", ".join(f"{n} {g:.2f}x" for n, g in result["growth"][p].items()))
    os.makedirs(out, exist_ok=True)
    result["plot"] = _plot(data, widths, steps, os.path.join(out, "mup_coord.png"))
    log(f"plot: {result['plot']}")
    log(json.dumps(result))
    return result


def _plot(data: dict[str, dict[int, list[dict[str, float]]]], widths: list[int], steps: int, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(LAYERS), figsize=(3.2 * len(LAYERS), 6.2), squeeze=False)
    for row, (p, by_width) in enumerate(data.items()):
        for col, name in enumerate(LAYERS):
            ax = axes[row][col]
            for t in range(steps + 1):
                ax.plot(widths, [by_width[w][t][name] for w in widths], marker="o", label=f"step {t}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{p}: {name}", fontsize=9)
            ax.set_xlabel("width")
    axes[0][0].set_ylabel("mean |activation|")
    axes[1][0].set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
