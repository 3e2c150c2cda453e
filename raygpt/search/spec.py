"""A search file: the training config it starts from, the space of values to try, the Tune
settings, and the trials it expands to, each validated as the trainer would before launch.

Pure: no Ray here (raygpt.search.tune runs the trials). Three ways to pick trials:
- grid: every point of the grid keys, times `num_samples` draws of the distributions;
- random: `num_samples` distinct points of the grid, drawn without replacement (seeded), for
  grids too large to run whole (nine keys of a few values each is tens of thousands of points);
- optuna: `num_samples` trials suggested by Optuna's TPE as results come in.
Grid and random trials are launched in a seeded random order (printed and saved with the
experiment): asynchronous ASHA compares a trial only with those that reached a rung before it,
so a grid listed weakest-first would set a low bar and stop nothing.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import os
import random
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator

from raygpt.config import (
    SECTIONS,
    Config,
    _parse_override,
    apply_overrides,
    coerce,
    config_from_dict,
    eval_metrics,
    is_plain_name,
    read_yaml_file,
)
from raygpt.data.shards import check_shards, load_manifest
from raygpt.errors import UserError
from raygpt.training.plan import plan_for

# What the trainer reports at every eval: the metrics and time counters a search may use.
REPORTED = ("step", "epoch", "train_loss", "val_loss", "lr", "tokens_seen", "tokens_per_s", "elapsed")
TIME_ATTRS = ("step", "tokens_seen")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
SEARCH_ALGS = ("grid", "random", "optuna")
SCHEDULERS = ("asha", "hyperband")


@dataclass
class TuneSettings:
    name: str | None = None  # experiment folder under run.storage_path; None: a unique name
    search_alg: str = "grid"  # grid | random (distinct grid points, seeded) | optuna (TPE)
    num_samples: int = 1  # grid: draws per grid point; random and optuna: trials in all
    max_concurrent_trials: int = 0  # 0: as many as the cluster fits (never more than fit)
    max_failures: int = 1  # retries of a trial that errors, from its own newest checkpoint
    metric: str = "val_loss"
    mode: str = "min"
    time_attr: str = "step"  # a counter the trainer reports (restarts do not reset it)
    grace_period: int = 10
    reduction_factor: float = 3.0
    max_t: int | None = None  # None: the longest trial's total (steps or tokens)
    early_stopping: bool = True  # false: run every trial to the end (the full-grid baseline)
    scheduler: str = "asha"  # asha (asynchronous) | hyperband (synchronous: pauses trials at each rung)
    shuffle: bool = True  # launch grid and random trials in a seeded random order
    in_process: bool = True  # 1-worker trials run the loop inside the trial; false: a TorchTrainer each
    seed: int = 0  # for the launch order, the sampled points and the draws of distributions


@dataclass
class Search:
    base: dict[str, Any]  # the training config, as a raw dict
    space: dict[str, dict[str, Any]]  # "section.key" -> {"grid": [...]} / {"uniform": [lo, hi]} / ...
    settings: TuneSettings = field(default_factory=TuneSettings)

    @property
    def grid_keys(self) -> list[str]:
        return [k for k, spec in self.space.items() if "grid" in spec]

    @property
    def grid_size(self) -> int:
        return math.prod(len(self.space[k]["grid"]) for k in self.grid_keys)


@dataclass
class Trial:
    overrides: dict[str, Any]
    config: Config
    total_steps: int
    total_tokens: int


# ----------------------------------------------------------------------------- the search file


def _valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def parse_search(raw: dict[str, Any], overrides: list[str] = ()) -> Search:
    """Split a search file into the base config, the search space and the Tune settings."""
    if not isinstance(raw, dict):
        raise UserError("a search file must be a mapping with the config sections, `search` and `tune`")
    raw = copy.deepcopy(raw)
    space = raw.pop("search", None)
    settings_raw = raw.pop("tune", None) or {}
    if not isinstance(space, dict) or not space:
        raise UserError("the search file needs a non-empty `search` section: section.key: {grid: [...]}")
    if not isinstance(settings_raw, dict):
        raise UserError(f"the `tune` section must be a mapping of settings, got {settings_raw!r}")
    hints = typing.get_type_hints(TuneSettings)
    for item in (o for o in overrides if o.startswith("tune.")):
        # read as a config key's `--set` is: YAML by the setting's type, text that is not YAML kept
        # as text (the setting's own check names it); an unknown key keeps its text for the error
        _, key, value = _parse_override(item)
        settings_raw[key] = value.resolve(hints[key]) if key in hints else value.text
    raw = apply_overrides(raw, [o for o in overrides if not o.startswith("tune.")])
    config_from_dict(copy.deepcopy(raw))  # the base config must be valid on its own
    valid = _valid_keys()
    for key, spec in space.items():
        if key not in valid:
            raise UserError(f"search key {key!r} is not a config key; valid keys: {', '.join(valid)}")
        if key.startswith("run.") or key == "data.dir":
            raise UserError(f"search key {key!r}: run settings and the data folder are fixed for a search")
        _check_spec(key, spec)
    settings = settings_from_dict(settings_raw, raw)
    search = Search(raw, space, settings)
    _check_sampling(search)
    return search


def settings_from_dict(raw: dict[str, Any], base: dict[str, Any] | None = None) -> TuneSettings:
    """Typed, validated Tune settings; a wrong key, type or range is a one-line UserError. `base`:
    the search's training config (raw), whose train.evals add metrics a search may rank on."""
    hints = typing.get_type_hints(TuneSettings)
    for key in raw:
        if key not in hints:
            raise UserError(f"unknown tune setting 'tune.{key}'; valid: {', '.join(hints)}")
    settings = TuneSettings(**{key: coerce(f"tune.{key}", value, hints[key]) for key, value in raw.items()})
    evals = ((base or {}).get("train") or {}).get("evals") or []
    _check_settings(settings, eval_metrics(evals) if isinstance(evals, list) else [])
    return settings


def _check_spec(key: str, spec: Any) -> None:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise UserError(f"search.{key}: give one of {', '.join(DISTRIBUTIONS)}, e.g. {{grid: [1, 2]}}; got {spec!r}")
    (kind, values), = spec.items()
    if kind in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise UserError(f"search.{key}: {kind} needs a non-empty list, got {values!r}")
        if kind == "grid":  # a repeated value would run the same trials again (choice: a weight)
            counts = collections.Counter(_hashable(v) for v in values)
            for value in values:
                if counts[_hashable(value)] > 1:
                    raise UserError(f"search.{key}: grid value {value!r} is given more than once "
                                    f"({counts[_hashable(value)]} times); list each value once")
    else:
        if (not isinstance(values, list) or len(values) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise UserError(f"search.{key}: {kind} needs [low, high], got {values!r}")
        low, high = values
        if low >= high:
            raise UserError(f"search.{key}: {kind} needs low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise UserError(f"search.{key}: loguniform needs low > 0, got {low}")


def _hashable(value: Any) -> Any:
    """A YAML value as something hashable that compares as the value does (lists as tuples)."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return frozenset((k, _hashable(v)) for k, v in value.items())
    return value


def _check_settings(s: TuneSettings, eval_scores: list[str] = ()) -> None:
    if s.search_alg not in SEARCH_ALGS:
        raise UserError(f"tune.search_alg must be one of {', '.join(SEARCH_ALGS)}, got {s.search_alg!r}")
    if s.name is not None and not is_plain_name(s.name):
        raise UserError(f"tune.name must be a plain folder name (letters, digits, '.', '_', '-'), got {s.name!r}")
    if s.scheduler not in SCHEDULERS:
        raise UserError(f"tune.scheduler must be one of {', '.join(SCHEDULERS)}, got {s.scheduler!r}")
    if s.metric not in (*REPORTED, *eval_scores):
        raise UserError(f"tune.metric {s.metric!r} is never reported by the trainer; "
                        f"choose one of {', '.join((*REPORTED, *eval_scores))} (train.evals add <name>_acc and "
                        f"<name>_acc_norm)")
    if s.mode not in ("min", "max"):
        raise UserError(f"tune.mode must be min or max, got {s.mode!r}")
    if s.time_attr not in TIME_ATTRS:
        raise UserError(f"tune.time_attr must be one of {', '.join(TIME_ATTRS)} (counters the trainer reports), "
                        f"got {s.time_attr!r}")
    for key in ("num_samples", "grace_period"):
        if getattr(s, key) < 1:
            raise UserError(f"tune.{key} must be >= 1, got {getattr(s, key)}")
    for key in ("max_concurrent_trials", "max_failures"):
        if getattr(s, key) < 0:
            raise UserError(f"tune.{key} must be >= 0, got {getattr(s, key)}")
    if not s.reduction_factor > 1:
        raise UserError(f"tune.reduction_factor must be > 1, got {s.reduction_factor}")
    if s.max_t is not None and s.grace_period > s.max_t:
        raise UserError(f"tune.grace_period {s.grace_period} must be <= tune.max_t {s.max_t}")


def _check_sampling(search: Search) -> None:
    s = search.settings
    if s.search_alg == "random" and search.grid_keys and s.num_samples > search.grid_size:
        raise UserError(f"tune.num_samples {s.num_samples} is larger than the grid ({search.grid_size} points): "
                        "random search draws distinct points; lower it, or use search_alg: grid")


def load_search(path: str, overrides: list[str] = ()) -> Search:
    if not os.path.isfile(path):
        raise UserError(f"search file not found: {path}")
    return parse_search(read_yaml_file(path, "search file"), list(overrides))


def search_base(search_file: dict[str, Any]) -> dict[str, Any]:
    """The training config part of a saved search file."""
    return {k: v for k, v in search_file.items() if k not in ("search", "tune", "launch")}


# ----------------------------------------------------------------------------- expanding trials


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    section, key = dotted.split(".", 1)
    raw.setdefault(section, {})[key] = value


def trial_config(base: dict[str, Any], overrides: dict[str, Any]) -> Config:
    """The base training config with one trial's values set (validated)."""
    raw = copy.deepcopy(base)
    for key, value in overrides.items():
        _set(raw, key, value)
    return config_from_dict(raw)


def check_trial(base: dict[str, Any], overrides: dict[str, Any], manifest: dict[str, Any] | None = None) -> Trial:
    """One trial validated as the trainer would, total steps over the data included (UserError)."""
    cfg = trial_config(base, overrides)
    plan = plan_for(cfg, cfg.data.dir, manifest)
    return Trial(overrides, cfg, plan.total_steps, plan.total_steps * cfg.train.batch_size * cfg.model.context_len)


def _draw(space: dict[str, dict[str, Any]], rng: random.Random) -> dict[str, Any]:
    """One draw of every distribution key (grid keys are set by the caller)."""
    values = {}
    for key, spec in space.items():
        (kind, bounds), = spec.items()
        if kind == "choice":
            values[key] = rng.choice(bounds)
        elif kind == "uniform":
            values[key] = rng.uniform(*bounds)
        elif kind == "loguniform":
            values[key] = math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1])))
    return values


def _grid_point(search: Search, index: int) -> dict[str, Any]:
    """Point `index` of the grid in itertools.product order, without building the product."""
    point = {}
    for key in reversed(search.grid_keys):
        values = search.space[key]["grid"]
        index, i = divmod(index, len(values))
        point[key] = values[i]
    return {key: point[key] for key in search.grid_keys}


# Grid points a random search considers at most: a grid this small is listed and shuffled whole;
# a larger one (10^10 points and more, past what a list or a range can hold) is drawn from, point
# by point, without replacement. Past this many refused points, the draws stop.
MAX_RANDOM_DRAWS = 100_000


def _random_order(size: int, rng: random.Random) -> Iterator[int]:
    """Distinct grid indices in a seeded random order, at most MAX_RANDOM_DRAWS of them."""
    if size <= MAX_RANDOM_DRAWS:
        order = list(range(size))
        rng.shuffle(order)
        yield from order
        return
    seen: set[int] = set()
    while len(seen) < MAX_RANDOM_DRAWS:  # size > MAX_RANDOM_DRAWS: it ends
        index = rng.randrange(size)
        if index not in seen:
            seen.add(index)
            yield index


def expand(search: Search) -> tuple[list[Trial], list[str]]:
    """The trials to launch, in launch order, and the reasons the rejected ones were refused.

    grid: every grid point x num_samples draws; random: num_samples distinct grid points (each
    with one draw of the distributions), taken without replacement in a seeded order, skipping
    points the trainer would refuse (at most MAX_RANDOM_DRAWS points in all). Optuna trials are
    not expanded (see raygpt.search.tune)."""
    s = search.settings
    rng = random.Random(s.seed)
    manifest = _manifest(search)
    trials, rejected = [], []

    def consider(overrides: dict[str, Any]) -> None:
        try:
            trials.append(check_trial(search.base, overrides, manifest))
        except UserError as exc:
            rejected.append(f"{describe_overrides(overrides)}: {exc}")

    if s.search_alg == "grid":
        for index in range(search.grid_size):
            for _ in range(s.num_samples):
                consider({**_grid_point(search, index), **_draw(search.space, rng)})
        if s.shuffle:
            random.Random(s.seed).shuffle(trials)
    elif s.search_alg == "random":
        for index in _random_order(search.grid_size, rng):  # without replacement
            if len(trials) == s.num_samples:
                break
            consider({**_grid_point(search, index), **_draw(search.space, rng)})
    return trials, rejected


def _manifest(search: Search) -> dict[str, Any]:
    """The data folder's manifest, read (and its shards checked) once for every trial's plan."""
    data_dir = config_from_dict(copy.deepcopy(search.base)).data.dir
    manifest = load_manifest(data_dir)
    check_shards(manifest, data_dir)
    return manifest


def describe_overrides(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in overrides.items())


def rung_milestones(settings: TuneSettings, max_t: float) -> list[float]:
    """The values of time_attr where ASHA judges a trial, up to max_t."""
    return [settings.grace_period * settings.reduction_factor ** k for k in range(rung_index(max_t, settings) + 1)]


def rung_index(value: float, settings: TuneSettings) -> int:
    """The last ASHA rung at or below `value` of time_attr: rung k is at grace_period x
    reduction_factor^k (Ray's ASHAScheduler makes the same rungs)."""
    k, milestone = 0, settings.grace_period
    while milestone * settings.reduction_factor <= value + 1e-9:
        milestone *= settings.reduction_factor
        k += 1
    return k
