"""Hyperparameter search on Ray Tune: the seed's grid as parallel trials with ASHA early stopping.

Each trial is the same Ray Train run as `raygpt train` (Train V2: a Tune function trial builds
and fits a TorchTrainer; TuneReportCallback passes worker reports up to Tune for ASHA). Trials
are expanded and validated here before launch, so a combination the trainer would reject is
never started; the experiment folder holds the search file, Tune's state, and each trial's
Train run as `train-<trial id>`.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

import yaml

from raygpt import checkpoint as ckpt
from raygpt.config import SECTIONS, Config, config_from_dict
from raygpt.errors import UserError
from raygpt.loop import plan_for

SEARCH_FILE = "search.yaml"
# What the trainer reports at every eval: the metrics and time counters a search may use.
REPORTED = ("step", "epoch", "train_loss", "val_loss", "lr", "tokens_seen", "tokens_per_s", "elapsed")
TIME_ATTRS = ("step", "tokens_seen")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")


@dataclass
class TuneSettings:
    name: str | None = None  # experiment folder under run.storage_path; None: a unique name
    num_samples: int = 1  # draws of the distributions per grid point
    max_concurrent_trials: int = 0  # 0: as many as the cluster fits
    metric: str = "val_loss"
    mode: str = "min"
    time_attr: str = "step"  # a counter the trainer reports (restarts do not reset it)
    grace_period: int = 10
    reduction_factor: float = 3.0
    max_t: int | None = None  # None: the longest trial's total (steps or tokens)
    early_stopping: bool = True  # false: run every trial to the end (the full-grid baseline)
    seed: int = 0  # for the draws of uniform / loguniform / choice


@dataclass
class Search:
    base: dict[str, Any]  # the training config, as a raw dict
    space: dict[str, dict[str, Any]]  # "section.key" -> {"grid": [...]} / {"uniform": [lo, hi]} / ...
    settings: TuneSettings = field(default_factory=TuneSettings)


@dataclass
class Trial:
    overrides: dict[str, Any]
    config: Config
    total_steps: int
    total_tokens: int


# ----------------------------------------------------------------------------- the search file


def _valid_keys() -> list[str]:
    import dataclasses

    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def parse_search(raw: dict[str, Any], overrides: list[str] = ()) -> Search:
    """Split a search file into the base config, the search space and the Tune settings."""
    from raygpt.config import apply_overrides

    if not isinstance(raw, dict):
        raise UserError("a search file must be a mapping with the config sections, `search` and `tune`")
    raw = copy.deepcopy(raw)
    space = raw.pop("search", None)
    settings_raw = raw.pop("tune", None) or {}
    if not isinstance(space, dict) or not space:
        raise UserError("the search file needs a non-empty `search` section: section.key: {grid: [...]}")
    tune_sets = [o for o in overrides if o.startswith("tune.")]
    for item in tune_sets:
        key, _, value = item[len("tune."):].partition("=")
        settings_raw[key] = yaml.safe_load(value)
    raw = apply_overrides(raw, [o for o in overrides if not o.startswith("tune.")])
    config_from_dict(copy.deepcopy(raw))  # the base config must be valid on its own
    valid = _valid_keys()
    for key, spec in space.items():
        if key not in valid:
            raise UserError(f"search key {key!r} is not a config key; valid keys: {', '.join(valid)}")
        if key.startswith("run.") or key == "data.dir":
            raise UserError(f"search key {key!r}: run settings and the data folder are fixed for a search")
        _check_spec(key, spec)
    known = [f.name for f in __import__("dataclasses").fields(TuneSettings)]
    for key in settings_raw:
        if key not in known:
            raise UserError(f"unknown tune setting 'tune.{key}'; valid: {', '.join(known)}")
    settings = TuneSettings(**settings_raw)
    _check_settings(settings)
    return Search(raw, space, settings)


def _check_spec(key: str, spec: Any) -> None:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise UserError(f"search.{key}: give one of {', '.join(DISTRIBUTIONS)}, e.g. {{grid: [1, 2]}}; got {spec!r}")
    (kind, values), = spec.items()
    if kind in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise UserError(f"search.{key}: {kind} needs a non-empty list, got {values!r}")
    else:
        if (not isinstance(values, list) or len(values) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise UserError(f"search.{key}: {kind} needs [low, high], got {values!r}")
        low, high = values
        if low >= high:
            raise UserError(f"search.{key}: {kind} needs low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise UserError(f"search.{key}: loguniform needs low > 0, got {low}")


def _check_settings(s: TuneSettings) -> None:
    if s.metric not in REPORTED:
        raise UserError(f"tune.metric {s.metric!r} is never reported by the trainer; choose one of {', '.join(REPORTED)}")
    if s.mode not in ("min", "max"):
        raise UserError(f"tune.mode must be min or max, got {s.mode!r}")
    if s.time_attr not in TIME_ATTRS:
        raise UserError(f"tune.time_attr must be one of {', '.join(TIME_ATTRS)} (counters the trainer reports), "
                        f"got {s.time_attr!r}")
    if s.num_samples < 1 or s.grace_period < 1 or s.reduction_factor <= 1 or s.max_concurrent_trials < 0:
        raise UserError("tune: num_samples and grace_period must be >= 1, reduction_factor > 1, "
                        "max_concurrent_trials >= 0")
    if s.max_t is not None and s.grace_period > s.max_t:
        raise UserError(f"tune.grace_period {s.grace_period} must be <= tune.max_t {s.max_t}")


def load_search(path: str, overrides: list[str] = ()) -> Search:
    if not os.path.isfile(path):
        raise UserError(f"search file not found: {path}")
    try:
        raw = yaml.safe_load(open(path).read())
    except yaml.YAMLError as exc:
        raise UserError(f"search file {path} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_search(raw, list(overrides))


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


def expand(search: Search) -> tuple[list[Trial], list[str]]:
    """Every grid point x num_samples draws, applied to the base config and validated as the
    trainer would (including total steps over the data). Returns (trials, reasons rejected)."""
    rng = random.Random(search.settings.seed)
    grid_keys = [k for k, spec in search.space.items() if "grid" in spec]
    points = list(itertools.product(*(search.space[k]["grid"] for k in grid_keys)))
    trials, rejected = [], []
    for point in points:
        for _ in range(search.settings.num_samples):
            overrides = dict(zip(grid_keys, point))
            for key, spec in search.space.items():
                (kind, values), = spec.items()
                if kind == "choice":
                    overrides[key] = rng.choice(values)
                elif kind == "uniform":
                    overrides[key] = rng.uniform(*values)
                elif kind == "loguniform":
                    overrides[key] = math.exp(rng.uniform(math.log(values[0]), math.log(values[1])))
            try:
                cfg = trial_config(search.base, overrides)
                plan = plan_for(cfg, cfg.data.dir)
            except UserError as exc:
                rejected.append(f"{_describe(overrides)}: {exc}")
                continue
            tokens = plan.total_steps * cfg.train.batch_size * cfg.model.context_len
            trials.append(Trial(overrides, cfg, plan.total_steps, tokens))
    return trials, rejected


def _describe(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in overrides.items())


# ----------------------------------------------------------------------------- running


def tune_trial(params: dict[str, Any]) -> None:
    """One trial: the same Ray Train run as `raygpt train`, inside the experiment folder,
    named from the trial id so a restored trial resumes its own run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raygpt.train import RunPaths, build_trainer

    experiment_dir = params["experiment_dir"]
    search = yaml.safe_load(ckpt.read_text(ckpt.join(experiment_dir, SEARCH_FILE)))
    cfg = trial_config(search_base(search), params["hp"])
    run = RunPaths(experiment_dir, f"train-{ray.tune.get_context().get_trial_id()}")
    cfg.run.name = run.name
    trainer = build_trainer(cfg, run, ckpt.resolve_storage(cfg.data.dir), extra_callbacks=[TuneReportCallback()])
    trainer.fit()


def search_base(search_file: dict[str, Any]) -> dict[str, Any]:
    """The training config part of a saved search file."""
    return {k: v for k, v in search_file.items() if k not in ("search", "tune")}


def _trainable():
    import ray.tune

    # The trial driver only waits on its Train controller: a sliver of a CPU, so the cluster's
    # CPUs go to training workers (Tune refuses 0).
    return ray.tune.with_resources(tune_trial, {"CPU": 0.01})


def _scheduler(settings: TuneSettings, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not settings.early_stopping:
        return FIFOScheduler()
    return ASHAScheduler(time_attr=settings.time_attr, max_t=max_t, grace_period=settings.grace_period,
                         reduction_factor=settings.reduction_factor)


def _experiment_name(settings: TuneSettings) -> str:
    import secrets
    import time

    return settings.name or f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def run_search(search: Search, *, address: str | None = None, log=print) -> str:
    """Launch the search; return the experiment folder (analysed by raygpt.analysis)."""
    import ray.tune
    from ray.tune import RunConfig, TuneConfig, Tuner

    from raygpt.train import check_paths_on_nodes, check_resources, start_ray

    trials, rejected = expand(search)
    s = search.settings
    total = len(trials) + len(rejected)
    log(f"search: {total} configurations, {len(trials)} to launch, {len(rejected)} rejected before launch")
    for reason in rejected:
        log(f"  rejected: {reason}")
    if not trials:
        raise UserError("every configuration of the search is rejected; nothing to launch")
    first = trials[0].config
    storage = ckpt.resolve_storage(first.run.storage_path)
    name = _experiment_name(s)
    experiment_dir = ckpt.join(storage, name)
    if ckpt.exists(experiment_dir):
        raise UserError(f"experiment {name} already exists in {storage}; use `raygpt tune --resume {experiment_dir}`")
    start_ray(address)
    check_resources(first, log)
    max_t = s.max_t or max(t.total_steps if s.time_attr == "step" else t.total_tokens for t in trials)
    # The saved search is what trials (and a resumed search) build their configs from; the data
    # folder is made absolute because every trial runs in a folder of its own.
    base = copy.deepcopy(search.base)
    base.setdefault("data", {})["dir"] = ckpt.resolve_storage(trials[0].config.data.dir)
    ckpt.write_text(ckpt.join(experiment_dir, SEARCH_FILE), yaml.safe_dump(
        {**base, "search": search.space, "tune": {**vars(s), "name": name}}, sort_keys=False))
    check_paths_on_nodes({"data.dir": base["data"]["dir"], "experiment folder": experiment_dir})
    # Only the searched values go into Tune's config: its status table shows them as they are.
    param_space = {"experiment_dir": experiment_dir, "hp": ray.tune.grid_search([t.overrides for t in trials])}
    tuner = Tuner(
        _trainable(),
        param_space=param_space,
        tune_config=TuneConfig(metric=s.metric, mode=s.mode, scheduler=_scheduler(s, max_t),
                               max_concurrent_trials=s.max_concurrent_trials or None),
        run_config=RunConfig(name=name, storage_path=storage),
    )
    log(f"experiment {name}: {len(trials)} trials x {first.run.num_workers} workers, ASHA on {s.metric} "
        f"by {s.time_attr} (grace {s.grace_period}, reduction {s.reduction_factor:g}, max_t {max_t})"
        if s.early_stopping else f"experiment {name}: {len(trials)} trials, no early stopping")
    tuner.fit()
    return experiment_dir


def resume_search(experiment_dir: str, *, address: str | None = None, log=print) -> str:
    """Continue an interrupted search: finished trials stay, unfinished ones resume from their
    checkpoints, errored ones are retried."""
    from ray.tune import Tuner

    from raygpt.train import start_ray

    experiment_dir = ckpt.resolve_storage(experiment_dir).rstrip("/")
    if not ckpt.exists(ckpt.join(experiment_dir, SEARCH_FILE)) or not Tuner.can_restore(experiment_dir):
        raise UserError(f"no raygpt experiment to resume in {experiment_dir}")
    start_ray(address)
    log(f"resuming experiment {experiment_dir}")
    Tuner.restore(experiment_dir, trainable=_trainable(), resume_unfinished=True, resume_errored=True).fit()
    return experiment_dir
