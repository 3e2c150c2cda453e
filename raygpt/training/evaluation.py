"""Evaluation: the loss over fixed windows spread across a whole split, shared among the workers,
the recipe's first-N-batches eval as an option, and the progress sample.

Deterministic and RNG-free: the same windows at every eval, on every rank and on any worker
count, so curves from runs of different sizes (and a resumed run's) line up.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from raygpt.config import Config
from raygpt.data.windows import WindowDataset
from raygpt.tokenizer import EOT_ID, gpt2_encoding
from raygpt.training import speed
from raygpt.training.runtime import Runtime
from raygpt.training.sharding import is_sharded


def spread_windows(n_windows: int, count: int) -> list[int]:
    """`count` window indices spread evenly over a split of `n_windows` windows (all of them when
    count >= n_windows): sorted, distinct, gaps differing by at most one, the first and the last
    window included (count >= 2; one window is the first). Pure: the same at every eval, on every
    rank and on any worker count."""
    count = max(0, min(count, n_windows))
    if count <= 1:
        return [0] * count
    return [i * (n_windows - 1) // (count - 1) for i in range(count)]


def eval_window_count(tokens: int | None, context_len: int, n_windows: int) -> int:
    """Windows of an eval of `tokens` tokens: ceil(tokens / context_len), at most the split's
    `n_windows` (None: the whole split)."""
    return n_windows if tokens is None else min(n_windows, -(-tokens // context_len))


def sum_over_workers(values: list[float], rt: Runtime) -> list[float]:
    """Element-wise sum over the workers, in float64 (the values themselves on one worker)."""
    if rt.world_size == 1 or not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: WindowDataset, windows: list[int], batch: int, rt: Runtime,
             precision: str = "fp32") -> tuple[float, int]:
    """(mean cross-entropy over the windows `windows` of `ds`, how many windows), shared among the
    workers: this rank scores windows[rank::world_size], `batch` windows per forward pass, and the
    per-window loss sums and counts are all-reduced in float64, so the mean over the same windows
    is the same on any worker count up to float rounding. Draws no random number (no DataLoader)."""
    model.eval()
    mine = windows[rt.rank::rt.world_size]
    total = torch.zeros((), dtype=torch.float64, device=rt.device)
    # A sharded model's forward is a collective: every rank runs as many as rank 0 (which has the
    # most windows), the extra ones on a throwaway window.
    most = len(windows[0::rt.world_size]) if is_sharded(model) else len(mine)
    for start in range(0, most, batch):
        chunk = mine[start:start + batch]
        xs, ys = zip(*(ds[i] for i in chunk or windows[:1]))
        x = torch.stack(xs).to(rt.device, non_blocking=True)
        y = torch.stack(ys).to(rt.device, non_blocking=True)
        with speed.autocast(rt.device, precision):
            losses = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
        if chunk:
            total += losses.float().view(len(xs), -1).mean(dim=1).double().sum()
    model.train()
    loss_sum, count = sum_over_workers([total.item(), float(len(mine))], rt)
    return loss_sum / max(count, 1.0), int(count)


@torch.no_grad()
def evaluate_first(model: torch.nn.Module, loader: DataLoader, batches: int, rt: Runtime,
                   precision: str = "fp32") -> tuple[float, int]:
    """`train.eval_mode: first`, the original recipe's eval: the mean cross-entropy of the first
    `batches` batches of `loader` (this rank's share of the split, in order), averaged over the
    workers; and how many windows all workers read."""
    model.eval()
    total, count, windows = 0.0, 0, 0
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        x, y = x.to(rt.device), y.to(rt.device)
        with speed.autocast(rt.device, precision):
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        count += 1
        windows += len(x)
    model.train()
    shared = rt.world_size > 1 and dist.is_initialized()
    mean_sum, windows_all = sum_over_workers([total / max(count, 1), float(windows)], rt)
    return mean_sum / (rt.world_size if shared else 1), int(windows_all)


def generate_sample(model: torch.nn.Module, prompt: str, device: torch.device, seed: int,
                    max_new_tokens: int = 40) -> str:
    """A progress sample: top-k sampling from its own generator (greedy decoding of a young model
    is mostly whitespace), so the training RNG is untouched."""
    enc = gpt2_encoding()
    idx = torch.tensor([enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT_ID]], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens=max_new_tokens, temperature=0.8, top_k=40, eos_id=EOT_ID,
                         generator=generator)
    return enc.decode(out[0].tolist())


class EvalSets:
    """What a report evaluates: train windows and non-overlapping val windows, either spread over
    each whole split (the last report reads `final_eval_tokens` of val) or, with
    `train.eval_mode: first`, each worker's first `eval_iter` micro-batches of its share.

    The step-0 report of a new run (`initial`) reads one global batch of spread windows per
    split: an untrained model's loss is ln(vocabulary) to within noise anywhere, and a full eval
    there (65,536 tokens per split by default; README "Evaluation" has its cost) would be most of
    the start-up."""

    def __init__(self, cfg: Config, train_ds: WindowDataset, val_ds: WindowDataset, micro_batch: int, rt: Runtime):
        t, m = cfg.train, cfg.model
        self.mode, self.eval_iter, self.micro_batch, self.context_len, self.rt = (
            t.eval_mode, t.eval_iter, micro_batch, m.context_len, rt)
        self.precision = speed.resolve_precision(t.precision, rt.device)
        self.datasets = {"train": train_ds, "val": val_ds}
        self.loaders: dict[str, DataLoader] = {}
        self.windows: dict[tuple[str, bool], list[int]] = {}
        self.initial: dict[str, list[int]] = {}
        if t.eval_mode == "first":
            for split, ds in self.datasets.items():
                es = DistributedSampler(ds, num_replicas=rt.world_size, rank=rt.rank, shuffle=False)
                self.loaders[split] = DataLoader(ds, batch_size=micro_batch, sampler=es,
                                                 pin_memory=rt.device.type == "cuda")
        else:
            final_tokens = None if t.final_eval_tokens is None else max(t.final_eval_tokens, t.eval_tokens)
            for split, final, tokens in (("train", False, t.eval_tokens), ("val", False, t.eval_tokens),
                                         ("val", True, final_tokens)):
                n = len(self.datasets[split])
                self.windows[split, final] = spread_windows(n, eval_window_count(tokens, m.context_len, n))
            for split in ("train", "val"):
                n = len(self.datasets[split])
                self.initial[split] = spread_windows(n, min(t.batch_size, len(self.windows[split, False])))

    def evaluate(self, model: torch.nn.Module, final: bool, initial: bool = False) -> dict[str, Any]:
        """Train and val loss, the tokens each read, the seconds both took, and whether this was
        the final eval (its larger val sample)."""
        t0, out = time.perf_counter(), {}
        for split, ds in self.datasets.items():
            if self.mode == "first":
                out[split] = evaluate_first(model, self.loaders[split], self.eval_iter, self.rt, self.precision)
            else:
                windows = self.initial[split] if initial else self.windows[split, final and split == "val"]
                out[split] = evaluate(model, ds, windows, self.micro_batch, self.rt, self.precision)
        return {"train_loss": out["train"][0], "val_loss": out["val"][0],
                "eval_tokens": out["val"][1] * self.context_len,
                "train_eval_tokens": out["train"][1] * self.context_len,
                "eval_time": time.perf_counter() - t0, "final_eval": final and self.mode == "spread"}
