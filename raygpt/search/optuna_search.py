"""`tune.search_alg: optuna`: trials suggested by Optuna's TPE sampler (Ray Tune's OptunaSearch)
as results come in, instead of a grid or random points. Needs the optional `optuna` package
(`pip install 'raygpt[optuna]'`); imported only when a search asks for it.

A suggestion the trainer would refuse (say, initial_lr above peak_lr) is rejected before launch
like any other: Optuna is told that point failed and asked again.
"""

from __future__ import annotations

import itertools
from typing import Any

from ray.tune.search import Searcher

from raygpt.errors import UserError
from raygpt.search.spec import Search, Trial, check_trial, describe_overrides

# Keys that change how long a trial trains: the longest combination of them sets ASHA's max_t.
LENGTH_KEYS = ("train.batch_size", "train.num_epochs", "train.max_steps", "train.max_tokens",
               "train.grad_accum_steps", "model.context_len", "data.stride")
MAX_SUGGESTIONS_PER_TRIAL = 1000


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("tune.search_alg: optuna needs the optuna package: pip install 'raygpt[optuna]'") from None
    return optuna


def length_probes(search: Search) -> list[Trial]:
    """Valid trials over every combination of the searched keys that set a trial's length (the
    other keys at their first value): the longest of them bounds every trial Optuna can suggest."""
    keys = [k for k in search.space if k in LENGTH_KEYS and ("grid" in search.space[k] or "choice" in search.space[k])]
    first = {k: next(iter(spec.values()))[0] for k, spec in search.space.items() if "grid" in spec or "choice" in spec}
    probes = []
    for values in itertools.product(*(next(iter(search.space[k].values())) for k in keys)):
        try:
            probes.append(check_trial(search.base, {**first, **dict(zip(keys, values))}))
        except UserError:
            continue
    if not probes:
        raise UserError("no configuration of the search is valid for the trainer; nothing to launch")
    return probes


def optuna_space(search: Search) -> dict[str, Any]:
    """The search space as Optuna distributions, keyed as Tune's config `hp/<section.key>`."""
    optuna = _import_optuna()
    dists = optuna.distributions
    space = {}
    for key, spec in search.space.items():
        (kind, values), = spec.items()
        if kind in ("grid", "choice"):
            space[f"hp/{key}"] = dists.CategoricalDistribution(values)
        else:
            space[f"hp/{key}"] = dists.FloatDistribution(values[0], values[1], log=kind == "loguniform")
    return space


def optuna_searcher(search: Search) -> "ValidatingSearcher":
    """Ray Tune's OptunaSearch (TPE, seeded) behind a filter that rejects what the trainer would."""
    optuna = _import_optuna()
    from ray.tune.search.optuna import OptunaSearch

    s = search.settings
    inner = OptunaSearch(space=optuna_space(search), metric=s.metric, mode=s.mode,
                         sampler=optuna.samplers.TPESampler(seed=s.seed))
    return ValidatingSearcher(inner, search.base)


class ValidatingSearcher(Searcher):
    """Asks the inner searcher again (telling it the point failed) until it suggests a config the
    trainer accepts."""

    def __init__(self, inner: Searcher, base: dict[str, Any]):
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner, self.base = inner, base
        self.rejected: list[str] = []
        self.inner_ids: dict[str, str] = {}  # Tune's trial id -> the id the inner searcher knows

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def reason_rejected(self, overrides: dict[str, Any]) -> str | None:
        try:
            check_trial(self.base, overrides)
        except UserError as exc:
            return f"{describe_overrides(overrides)}: {exc}"
        return None

    def suggest(self, trial_id: str):
        for attempt in range(MAX_SUGGESTIONS_PER_TRIAL):
            inner_id = trial_id if attempt == 0 else f"{trial_id}-rejected{attempt}"
            config = self.inner.suggest(inner_id)
            if not isinstance(config, dict):
                return config  # None (wait) or FINISHED
            reason = self.reason_rejected(config["hp"])
            if reason is None:
                self.inner_ids[trial_id] = inner_id
                return config
            self.rejected.append(reason)
            print(f"  rejected before launch: {reason}")  # Tune pickles the searcher: no logger kept
            self.inner.on_trial_complete(inner_id, error=True)
        raise UserError(f"Optuna suggested {MAX_SUGGESTIONS_PER_TRIAL} configurations in a row that the "
                        "trainer refuses; narrow the search space")

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.inner.on_trial_result(self.inner_ids.get(trial_id, trial_id), result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.inner.on_trial_complete(self.inner_ids.pop(trial_id, trial_id), result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.inner.restore(checkpoint_path)
