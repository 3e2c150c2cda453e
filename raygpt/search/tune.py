"""Hyperparameter search on Ray Tune: trials in parallel, ASHA stopping weak ones early.

Each trial trains one config of the search (raygpt.search.spec expands and validates them) into its
own run folder `train-<launch index>` inside the experiment folder, with the same loop as `raygpt
train`. A 1-worker trial runs the loop inside the Tune trial itself (Tune reserves its worker's
CPUs/GPU; no Train controller to start); a multi-worker trial builds and fits a TorchTrainer
(Train V2), whose TuneReportCallback passes reports up to ASHA. Either way a trial reports at
every eval, saves where ASHA may stop it, and a retried or resumed trial continues from the
newest valid checkpoint in its run folder.

Trials never start more at once than the cluster fits: in Train V2, Tune does not reserve a
multi-worker trial's workers, so the cap is computed here from what one trial holds.
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
import time
import uuid
from typing import Any

import yaml

from raygpt import storage
from raygpt.cluster import resource_shape
from raygpt.config import Config
from raygpt.errors import UserError
from raygpt.runs import SEARCH_FILE, check_storage_root, read_search_file
from raygpt.search.experiment_state import read_trials
from raygpt.search.spec import (
    Search,
    Trial,
    TuneSettings,
    check_trial,
    describe_overrides,
    expand,
    rung_milestones,
    search_base,
    settings_from_dict,
    trial_config,
)

# A multi-worker trial's driver only waits on its Train controller; it reserves a token amount of
# memory (Tune refuses an empty reservation) so that every CPU goes to training workers.
DRIVER_RESOURCES = {"memory": 1}
# A multi-worker trial's workers wait at least this long for their resources: a trial stopped by
# ASHA frees its workers' placement group only some seconds after it is stopped.
MIN_TRIAL_START_WAIT_S = 600.0


# ----------------------------------------------------------------------------- what a trial holds


def runs_in_trial(cfg: Config, settings: TuneSettings) -> bool:
    """1-worker trials run the loop inside the Tune trial (no Train controller, no worker group)."""
    return cfg.run.num_workers == 1 and settings.in_process


def trial_reservation(cfg: Config, settings: TuneSettings) -> dict[str, float]:
    """What Tune reserves for one trial."""
    from raygpt.cluster import worker_resources

    return worker_resources(cfg) if runs_in_trial(cfg, settings) else dict(DRIVER_RESOURCES)


def trial_footprint(cfg: Config, settings: TuneSettings) -> dict[str, float]:
    """Everything one trial holds while it trains: its reservation plus, for a multi-worker
    trial, the workers its Train controller asks for on its own."""
    from raygpt.cluster import worker_resources

    if runs_in_trial(cfg, settings):
        return worker_resources(cfg)
    return {k: v * cfg.run.num_workers for k, v in worker_resources(cfg).items()}


def trials_that_fit(capacity: dict[str, float], footprint: dict[str, float]) -> int:
    """How many trials of `footprint` the resources `capacity` hold at once (by the scarcest)."""
    return min(int(capacity.get(k, 0) / v + 1e-9) for k, v in footprint.items() if v > 0)


def concurrency(cfg: Config, settings: TuneSettings, num_trials: int) -> tuple[int | None, str]:
    """The number of trials to run at once and why: the setting, never more than the cluster fits
    (the whole cluster an autoscaler may grow to). A trial that can never fit is refused."""
    from raygpt.cluster import cluster_capacity

    asked = settings.max_concurrent_trials or None
    footprint = trial_footprint(cfg, settings)
    capacity, grows = cluster_capacity()
    if capacity is None:  # an autoscaler that does not publish its node shapes
        return asked, (f"max_concurrent_trials {asked}" if asked else "no concurrency cap: the autoscaler "
                       "publishes no node shapes; set tune.max_concurrent_trials")
    fit = trials_that_fit(capacity, footprint)
    where = f"the cluster {'can grow to' if grows else 'has'} {resource_shape(capacity, footprint)}"
    if fit == 0:
        raise UserError(f"one trial needs {resource_shape(footprint)} (run.num_workers x run.cpus_per_worker"
                        f"{', run.gpus_per_worker' if cfg.run.use_gpu else ''}) but {where}")
    cap = min(fit, num_trials) if asked is None else min(asked, fit)
    if asked is not None and asked > fit:
        return cap, (f"max_concurrent_trials {asked} capped to {cap}: "
                     f"one trial holds {resource_shape(footprint)}, {where}")
    return cap, f"{cap} trials at once: one trial holds {resource_shape(footprint)}, {where}"


# ----------------------------------------------------------------------------- ASHA's rungs


def rung_save_steps(trial: Trial, settings: TuneSettings, max_t: float) -> tuple[int, ...]:
    """The steps whose report ASHA judges at each rung: a trial saves there, so one that is
    stopped keeps a checkpoint of where it stopped. ASHA judges the first report at or past a
    milestone; the loop reports every eval_freq and save_freq steps."""
    t = trial.config.train
    tokens_per_step = trial.total_tokens // trial.total_steps
    steps = set()
    for milestone in rung_milestones(settings, max_t):
        step = math.ceil(milestone if settings.time_attr == "step" else milestone / tokens_per_step)
        report = min(math.ceil(step / t.eval_freq) * t.eval_freq, math.ceil(step / t.save_freq) * t.save_freq)
        if report < trial.total_steps:
            steps.add(report)
    return tuple(sorted(steps))


def trial_save_steps(trial: Trial, settings: TuneSettings, max_t: float) -> tuple[int, ...]:
    """Steps where a trial saves beyond save_freq: ASHA's rungs; every report under HyperBand,
    which may pause a trial at any report and resumes it from its checkpoint."""
    if not settings.early_stopping:
        return ()
    if settings.scheduler == "hyperband":
        t = trial.config.train
        return tuple(range(t.eval_freq, trial.total_steps, t.eval_freq))
    return rung_save_steps(trial, settings, max_t)


def hyperband_smallest_bracket(max_t: int, reduction_factor: float) -> int:
    """Trials in the first bracket Ray's HyperBandScheduler halves (its bracket s=1; s=0 runs every
    trial to max_t). Halving waits for the bracket's trials to reach its milestone, and Tune creates
    only max_concurrent_trials at a time, so with fewer running at once nothing is ever stopped."""
    s_max_1 = int(round(math.log(max_t) / math.log(reduction_factor))) + 1
    return math.ceil(s_max_1 / 2 * reduction_factor)


def default_max_t(trials: list[Trial], settings: TuneSettings) -> int:
    return settings.max_t or max(t.total_steps if settings.time_attr == "step" else t.total_tokens for t in trials)


# ----------------------------------------------------------------------------- one trial


def trial_run_name(launch_index: int) -> str:
    """The run folder of the search's `launch_index`-th configuration (its place in
    search.yaml's launch order): the same however often the search is resumed, so a resumed
    trial continues its own run."""
    return f"train-{launch_index:05d}"


def tune_trial(params: dict[str, Any]) -> None:
    """One trial: the config of its searched values, trained into its run folder in the
    experiment folder (`trial_run_name`; an Optuna trial's is `train-<trial id>`), so a retried or
    resumed trial continues its own run."""
    import ray.tune

    from raygpt.runs import CONFIG_FILE, RunPaths

    experiment_dir = params["experiment_dir"]
    saved = read_search_file(experiment_dir)
    settings = settings_from_dict(saved["tune"], search_base(saved))
    point = params.get("trial") or {"hp": params["hp"], "run": f"train-{ray.tune.get_context().get_trial_id()}"}
    trial = check_trial(search_base(saved), point["hp"])
    cfg = trial.config
    run = RunPaths(experiment_dir, point["run"])
    cfg.run.name = run.name
    # A checkpoint is on storage before ASHA sees the report that saved it (ASHA may stop the
    # trial at that report): no background saves in a trial.
    cfg.run.async_save = False
    if not storage.exists(storage.join(run.uri, CONFIG_FILE)):
        storage.write_text(storage.join(run.uri, CONFIG_FILE), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    save_steps = trial_save_steps(trial, settings, saved["launch"]["max_t"])
    ended = ended_run_report(run.uri, trial.total_steps)
    if ended is not None:  # ran to its end before the search was interrupted: say so, train nothing
        ray.tune.report(ended)
        return
    data_dir = storage.resolve_storage(cfg.data.dir)
    experiment = saved["tune"].get("name")  # MLflow and W&B group the search's trials by it
    if runs_in_trial(cfg, settings):
        _train_in_trial(cfg, run.uri, data_dir, save_steps, experiment)
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        from raygpt.training.ray_train import build_trainer

        start_wait = max(cfg.run.resource_wait_s, MIN_TRIAL_START_WAIT_S)
        build_trainer(cfg, run, data_dir, extra_callbacks=[TuneReportCallback()], start_timeout_s=start_wait,
                      extra_save_steps=save_steps, experiment=experiment).fit()


def ended_run_report(run_uri: str, total_steps: int) -> dict[str, Any] | None:
    """The last report of a trial's run that already reached its last step with a complete
    checkpoint there, else None. The driver can die between a trial's last checkpoint and Tune
    recording it TERMINATED; a resume then runs the trial again, and a loop restored at its last
    step reports nothing, which Tune refuses (its metric must be in every result)."""
    from raygpt.runs import checkpoint_order, complete_checkpoints, read_metrics

    rows = read_metrics(run_uri)
    newest = complete_checkpoints(run_uri)[-1:]
    if not rows or rows[-1].get("step") != total_steps or not newest:
        return None
    if (checkpoint_order(newest[0].rsplit("/", 1)[-1]) or (None,))[0] != total_steps:
        return None
    return {k: v for k, v in rows[-1].items() if k != "sample"}


def _train_in_trial(cfg: Config, run_dir: str, data_dir: str, save_steps: tuple[int, ...],
                    experiment: str | None = None) -> None:
    """The loop in this process, on the CPUs (and GPU) Tune reserved for the trial."""
    import ray.tune
    import torch

    from raygpt.training.local import save_to_run_dir
    from raygpt.training.loop import train_loop
    from raygpt.training.runtime import Runtime, process_device

    save = save_to_run_dir(run_dir, keep=cfg.run.num_to_keep)

    def report(metrics: dict[str, Any], folder: str | None, name: str | None) -> None:
        save(metrics, folder, name)  # the checkpoint is on storage before ASHA sees the report
        ray.tune.report(metrics)

    # Ray shows the trial only its own GPU (CUDA_VISIBLE_DEVICES): cuda:0.
    device = process_device(cfg.run.use_gpu, 0, torch.cuda.device_count())
    rt = Runtime(device=device, run_dir=run_dir, fit_id=uuid.uuid4().hex,
                 report=report, extra_save_steps=frozenset(save_steps), experiment=experiment)
    train_loop(cfg, data_dir, rt)


def _trainable(cfg: Config, settings: TuneSettings):
    import ray.tune

    return ray.tune.with_resources(tune_trial, trial_reservation(cfg, settings))


def _scheduler(settings: TuneSettings, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    if not settings.early_stopping:
        return FIFOScheduler()
    if settings.scheduler == "hyperband":
        return HyperBandScheduler(time_attr=settings.time_attr, max_t=max_t, reduction_factor=settings.reduction_factor)
    return ASHAScheduler(time_attr=settings.time_attr, max_t=max_t, grace_period=settings.grace_period,
                         reduction_factor=settings.reduction_factor)


# ----------------------------------------------------------------------------- the search


def _tuner(first: Config, s: TuneSettings, experiment_dir: str, points: list[dict[str, Any]] | None, searcher: Any,
           num_trials: int, max_t: int, cap: int) -> Any:
    """The Tuner of a search (or of a resumed one's unfinished `points`): each grid point carries
    its searched values and its run folder; an Optuna searcher suggests the values itself."""
    import ray.tune
    from ray.tune import FailureConfig, RunConfig, TuneConfig, Tuner

    storage_root, name = experiment_dir.rsplit("/", 1)
    space = {"experiment_dir": experiment_dir, **({"hp": {}} if points is None else
                                                  {"trial": ray.tune.grid_search(points)})}
    return Tuner(
        _trainable(first, s),
        param_space=space,
        tune_config=TuneConfig(metric=s.metric, mode=s.mode, scheduler=_scheduler(s, max_t),
                               search_alg=searcher, num_samples=num_trials if searcher else 1,
                               max_concurrent_trials=cap),
        run_config=RunConfig(name=name, storage_path=storage_root,
                             failure_config=FailureConfig(max_failures=s.max_failures)),
    )


def _drop_restore_hint(record: logging.LogRecord) -> bool:
    return "Tuner.restore(" not in record.getMessage()


def fit(tuner: Any) -> None:
    """Run the search. On Ctrl-C / SIGINT Tune stops the trials, saves its state and returns; its
    hint to resume with `Tuner.restore(...)` is dropped: a raygpt search resumes with
    `raygpt tune --resume`, which the CLI says after the analysis of what finished."""
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addFilter(_drop_restore_hint)
    try:
        tuner.fit()
    finally:
        tune_log.removeFilter(_drop_restore_hint)


def _experiment_name(settings: TuneSettings) -> str:
    return settings.name or f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def run_search(search: Search, *, address: str | None = None, log=print, check_only: bool = False) -> str | None:
    """Launch the search; return the experiment folder (analysed by raygpt.search.analysis).
    `check_only` (`raygpt tune --check`): everything checked and the plan printed, nothing started."""

    from raygpt.cluster import check_paths_on_nodes, check_resources, start_ray

    s = search.settings
    searcher = None
    if s.search_alg == "optuna":  # trials are suggested as results come in; these bound their length
        from raygpt.search.optuna_search import length_probes, optuna_searcher

        trials, searcher = length_probes(search), optuna_searcher(search)
        log(f"search: {s.num_samples} trials suggested by Optuna (TPE, seed {s.seed}) over {len(search.space)} keys; "
            "suggestions the trainer refuses are rejected before launch")
    else:
        trials, rejected = expand(search)
        log(f"search: {len(trials) + len(rejected)} configurations, {len(trials)} to launch, "
            f"{len(rejected)} rejected before launch")
        for reason in rejected:
            log(f"  rejected: {reason}")
        if not trials:
            raise UserError("every configuration of the search is rejected; nothing to launch")
    first = trials[0].config
    if first.train.evals:  # the same files in every trial (data and run settings are not searched)
        from raygpt.multiple_choice import check_eval_data

        for line in check_eval_data(first.train.evals, min(t.config.model.context_len for t in trials)):
            log(line)
    from raygpt.training import trackers

    trackers.resolve(first)  # the loggers' packages, and their settings from this environment
    storage_root = check_storage_root(first.run.storage_path)
    name = _experiment_name(s)
    experiment_dir = storage.join(storage_root, name)
    if storage.exists(experiment_dir):
        raise UserError(f"experiment {name} already exists in {storage_root}; "
                        f"use `raygpt tune --resume {experiment_dir}`")
    max_t = default_max_t(trials, s)
    if s.early_stopping and s.scheduler == "asha" and s.grace_period > max_t:  # ASHA would assert inside Ray
        raise UserError(f"tune.grace_period {s.grace_period} is past every trial's end (max_t {max_t} "
                        f"{s.time_attr}s): ASHA could judge no trial; use a grace_period <= {max_t}")
    if check_only:
        log(f"launch order (seed {s.seed}{'' if s.shuffle else ', as listed'}):" if not searcher else
            f"{s.num_samples} trials suggested by Optuna")
        for i, trial in enumerate([] if searcher else trials):
            log(f"  {i + 1:>3}. {describe_overrides(trial.overrides)}")
        log(f"ok: experiment {name} (new) -> {experiment_dir}: {s.num_samples if searcher else len(trials)} trials, "
            f"max_t {max_t} {s.time_attr}s; nothing started (concurrency is set by the cluster at launch)")
        return None
    trackers.prepare(first, experiment=name)  # MLflow's store and the search's experiment, before any trial
    start_ray(address)
    check_resources(first, log)
    num_trials = s.num_samples if searcher else len(trials)
    cap, why = concurrency(first, s, num_trials)
    bracket = hyperband_smallest_bracket(max_t, s.reduction_factor)
    if s.scheduler == "hyperband" and s.early_stopping and cap < bracket:
        log(f"warning: tune.scheduler hyperband halves a bracket of {bracket} trials at the least, but only "
            f"{cap} run at once and Tune creates trials as slots free: it will stop nothing early (measured); "
            "use tune.scheduler asha, or more concurrency")
    if not searcher:
        log(f"launch order (seed {s.seed}{'' if s.shuffle else ', as listed'}):")
        for i, trial in enumerate(trials):
            log(f"  {i + 1:>3}. {describe_overrides(trial.overrides)}")
    # The saved search is what trials (and a resumed search) build their configs from; the data
    # folder is made absolute because every trial runs in a folder of its own.
    base = copy.deepcopy(search.base)
    base.setdefault("data", {})["dir"] = storage.resolve_storage(first.data.dir)
    if first.train.evals:  # so are train.evals' files
        base.setdefault("train", {})["evals"] = [{**e, "data": storage.resolve_storage(e["data"])}
                                                 for e in first.train.evals]
    # ... and the loggers' settings as resolved here: every trial logs to the same store and project.
    base.setdefault("run", {}).update({key: getattr(first.run, key) for key in trackers.RESOLVED
                                       if getattr(first.run, key) is not None})
    launch = {"max_t": max_t, "max_concurrent_trials": cap, "concurrency": why, "trials": num_trials,
              "order": None if searcher else [t.overrides for t in trials],
              "total_steps": None if searcher else [t.total_steps for t in trials]}
    storage.write_text(storage.join(experiment_dir, SEARCH_FILE), yaml.safe_dump(
        {**base, "search": search.space, "tune": {**vars(s), "name": name}, "launch": launch}, sort_keys=False))
    check_paths_on_nodes({"data.dir": base["data"]["dir"], "experiment folder": experiment_dir,
                          **{f"train.evals[{i}].data": e["data"] for i, e in enumerate(first.train.evals)}})
    # Only the searched values go into Tune's config: its status table shows them as they are.
    points = None if searcher else [{"hp": t.overrides, "run": trial_run_name(i)} for i, t in enumerate(trials)]
    tuner = _tuner(first, s, experiment_dir, points, searcher, num_trials, max_t, cap)
    runner = "in the trial" if runs_in_trial(first, s) else "a TorchTrainer each"
    log(f"experiment {name}: {num_trials} trials x {first.run.num_workers} workers ({runner}); {why}")
    log(f"  ASHA on {s.metric} by {s.time_attr} (grace {s.grace_period}, reduction {s.reduction_factor:g}, "
        f"max_t {max_t}); retries per trial: {s.max_failures}" if s.early_stopping else "  no early stopping")
    fit(tuner)
    return experiment_dir


def resumable(experiment_dir: str, saved: dict[str, Any] | None = None) -> bool:
    """Whether `resume_search` can continue the search: a grid search with its launch order saved
    (an Optuna searcher's state exists only as a pickle)."""
    saved = saved or read_search_file(experiment_dir)
    launch = saved.get("launch")
    return saved["tune"].get("search_alg") != "optuna" and isinstance(launch, dict) and isinstance(
        launch.get("order"), list)


def interruption(experiment_dir: str, rows: list[dict[str, Any]]) -> str | None:
    """What to say when the search was interrupted (Tune catches Ctrl-C / SIGINT, stops the trials,
    saves its state and returns as if done): fewer of its trials (the analysis `rows`) ended than it
    launches; None when every trial ended."""
    saved = read_search_file(experiment_dir)
    launch = saved.get("launch")
    ended = sum(r["status"] in ("TERMINATED", "ERROR") for r in rows)
    total = launch.get("trials") if isinstance(launch, dict) else None
    if not isinstance(total, int) or ended >= total:
        return None
    unfinished = f"search interrupted with {total - ended} of {total} trials unfinished"
    if resumable(experiment_dir, saved):
        return f"{unfinished}; continue it with `raygpt tune --resume {experiment_dir}`"
    return (f"{unfinished}; an Optuna search cannot resume (its searcher's state exists only as a pickle): "
            "start a new search")


def resume_search(experiment_dir: str, *, address: str | None = None, log=print) -> str:
    """Continue an interrupted search from raygpt's own files, unpickling nothing: search.yaml's
    launch order and Tune's trial records read as JSON say which configurations finished; the
    others (never started, interrupted or in ERROR) run again in a new Tuner over the same
    experiment folder, each into its own run folder, so it resumes from its newest checkpoint.
    (Ray's `Tuner.restore` would cloudpickle-load the folder's tuner.pkl and trial states: code
    anyone who can write to a shared bucket could plant.) An Optuna search cannot resume: its
    searcher's state exists only as a pickle."""
    from raygpt.cluster import start_ray
    from raygpt.search.experiment_state import newest_state_file

    experiment_dir = storage.resolve_storage(experiment_dir).rstrip("/")
    if not storage.exists(storage.join(experiment_dir, SEARCH_FILE)) or newest_state_file(experiment_dir) is None:
        raise UserError(f"no raygpt experiment to resume in {experiment_dir}")
    saved = read_search_file(experiment_dir)
    settings = settings_from_dict(saved["tune"], search_base(saved))
    launch = saved.get("launch")
    order = launch.get("order") if isinstance(launch, dict) else None
    if not resumable(experiment_dir, saved):
        raise UserError(f"{experiment_dir} is an Optuna search (or has no launch order): it cannot resume without "
                        "unpickling its searcher's state; start a new search")
    status = {t.run: t.status for t in read_trials(experiment_dir)}
    points = [{"hp": hp, "run": trial_run_name(i)} for i, hp in enumerate(order)
              if status.get(trial_run_name(i)) != "TERMINATED"]
    log(f"resuming experiment {experiment_dir}: {len(order) - len(points)} of {len(order)} trials finished, "
        f"{len(points)} to run")
    if not points:
        return experiment_dir
    first = trial_config(search_base(saved), {})
    from raygpt.training import trackers

    trackers.check_installed(first.run.loggers)  # the loggers' packages, here rather than in every trial
    start_ray(address)
    cap = min(int(launch.get("max_concurrent_trials") or 1), len(points))
    fit(_tuner(first, settings, experiment_dir, points, None, len(points), int(launch["max_t"]), cap))
    return experiment_dir

