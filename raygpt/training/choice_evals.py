"""train.evals: multiple-choice evals (HellaSwag, the user's jsonl) at reports, split over the workers.

Each eval is scored at step 0, every `every` steps and at the last report. Rank r scores items
r, r + world_size, ...; the right-answer counts are summed over the workers, so the figure is
the same on any worker count. The scores are a function of the weights alone, so a resumed run
logs the same values at the same steps. The latest scores ride along in every report to the
runtime (Tune checks that a search's metric is in every result, and ASHA reads it at any rung);
the metrics log holds each only at the steps where it was measured.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from raygpt.config import Config
from raygpt.multiple_choice import item_scores, loglikelihoods, read_items, requests_of
from raygpt.training import speed
from raygpt.training.evaluation import sum_over_workers
from raygpt.training.runtime import Runtime
from raygpt.training.sharding import is_sharded


class ChoiceEvals:
    def __init__(self, cfg: Config, rt: Runtime, batch_size: int, history: list[dict[str, Any]] = ()):
        """The evals of `cfg.train.evals`, their data read and this rank's share tokenized now (a
        bad file stops the run before training); the latest scores from `history` (a resumed
        run's metrics log)."""
        self.rt, self.batch_size, self.context_len = rt, batch_size, cfg.model.context_len
        self.precision = speed.resolve_precision(cfg.train.precision, rt.device)
        self.specs = cfg.train.evals
        self.items, self.requests, self.most = [], [], []
        for spec in self.specs:
            items = read_items(spec["data"], spec["task"], spec["limit"])
            mine = items[rt.rank::rt.world_size]
            self.items.append(mine)
            self.requests.append(requests_of(mine, self.context_len, f"{spec['data']} item",
                                             range(rt.rank, len(items), rt.world_size)))
            # forward passes of the rank with the most requests (every rank knows every item)
            counts = [sum(len(i.choices) for i in items[r::rt.world_size]) for r in range(rt.world_size)]
            self.most.append(math.ceil(max(counts) / batch_size))
        self.latest: dict[str, float] = {}
        for row in history:
            self.latest.update({k: row[k] for k in self.metric_names() if k in row})

    def metric_names(self) -> list[str]:
        return [f"{s['name']}_{score}" for s in self.specs for score in ("acc", "acc_norm")]

    def due(self, step: int, final: bool) -> list[int]:
        return [i for i, s in enumerate(self.specs) if step == 0 or final or step % s["every"] == 0]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, step: int, final: bool) -> dict[str, float]:
        """The scores of the evals due at this report (every rank calls it at the same steps)."""
        out: dict[str, float] = {}
        for i in self.due(step, final):
            t0, name = time.perf_counter(), self.specs[i]["name"]
            lls = loglikelihoods(model, self.requests[i], self.context_len, self.rt.device, self.batch_size,
                                 lambda: speed.autocast(self.rt.device, self.precision),
                                 forwards=self.most[i] if is_sharded(model) else 0)
            acc, acc_norm = item_scores(self.items[i], lls)
            acc, acc_norm, n = sum_over_workers([acc, acc_norm, float(len(self.items[i]))], self.rt)
            out.update({f"{name}_acc": acc / n, f"{name}_acc_norm": acc_norm / n,
                        f"{name}_items": int(n), f"{name}_time": time.perf_counter() - t0})
        self.latest.update({k: v for k, v in out.items() if k in self.metric_names()})
        return out
