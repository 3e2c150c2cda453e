"""Ray Train around the loop: a TorchTrainer with DDP workers, shared checkpoint storage,
failure handling and resume, and `raygpt train`'s launch. The loop it runs (`raygpt.training.loop`)
imports no Ray; the other edges are `raygpt.cluster` (starting and inspecting Ray, every private
Ray call) and `raygpt.search` (Ray Tune)."""

from __future__ import annotations

import sys
import uuid
from typing import Any

import yaml

from raygpt import checkpoint as ckpt
from raygpt import cluster, storage
from raygpt.config import Config, apply_overrides, config_from_dict, read_stored_yaml
from raygpt.data.shards import check_shards, load_manifest
from raygpt.errors import TrainingFailed, UserError
from raygpt.runs import (
    CONFIG_FILE,
    METRICS_FILE,
    Lease,
    RunPaths,
    best_checkpoint,
    check_storage_root,
    complete_checkpoints,
    list_checkpoints,
    new_run_name,
    newest_complete,
    peek_state,
    read_events,
    resume_paths,
)
from raygpt.training.loop import train_loop
from raygpt.training.plan import StepPlan, plan_for
from raygpt.training.recovery import describe_event
from raygpt.training.runtime import Runtime

# ----------------------------------------------------------------------------- runs and configs


def run_config(paths: RunPaths, overrides: list[str]) -> Config:
    """The config a run was started with (saved in its folder), with `--set` overrides."""
    uri = storage.join(paths.uri, CONFIG_FILE)
    if not storage.exists(uri):
        raise UserError(f"no run to resume at {paths.uri} (no {CONFIG_FILE}); check the name or storage_path")
    return config_from_dict(apply_overrides(read_stored_yaml(uri, "run config"), overrides))


def _check_resume(paths: RunPaths, cfg: Config, log=print, manifest: dict[str, Any] | None = None) -> None:
    """Before Ray starts: the run has a checkpoint whose state this raygpt reads, for this model
    shape (a damaged newest one is skipped, as the loop skips it)."""
    found = None
    for uri in reversed(complete_checkpoints(paths.uri)):  # the newest one the loop would restore
        state = peek_state(uri)
        if state is None:
            log(f"warning: skipping checkpoint {uri}: its state.json does not read")
            continue
        ckpt.check_state(state, uri)  # a newer format, or no model config: said as is, not skipped
        try:
            ckpt.check_resumable(state, uri)
            if not ckpt.weight_files(uri):
                raise UserError(f"checkpoint {uri} is incomplete: it holds no model.pt (nor sharded weights)")
        except UserError as exc:
            log(f"warning: skipping {exc}")
            continue
        found = uri, state
        break
    if found is None:
        raise UserError(f"run {paths.name} has no checkpoint to resume from ({paths.uri}"
                        f"{': none of them loads, see the warnings above' if list_checkpoints(paths.uri) else ''})")
    latest, state = found
    ckpt.check_same_shape(state["config"]["model"], cfg.model, latest)
    ckpt.check_same_data(state, (manifest or load_manifest(cfg.data.dir)).get("fingerprint"), latest)


# ----------------------------------------------------------------------------- Ray


def _ray_report(metrics: dict[str, Any], folder: str | None, name: str | None) -> None:
    import ray.train

    if folder is None:
        ray.train.report(metrics)
    else:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)


def _worker_log(line: str) -> None:
    # Not print(): Ray Train patches print to tee into its logger, which doubles every line.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def ray_worker_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker: thin wiring from Ray to the plain loop."""
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(loop_config["config"])
    cluster.quiet_report_lines()
    missing = cluster.missing_here({"data.dir": loop_config["data_dir"], "run folder": loop_config["run_dir"]})
    if missing:  # a node the autoscaler added after the driver's check, without the shared mount
        raise cluster.not_shared(missing, ray.util.get_node_ip_address())
    ctx = ray.train.get_context()
    # The run restores from the newest valid checkpoint in its folder: the one Ray registered
    # (ray.train.get_checkpoint) is there, and so may be newer ones Ray never registered (saved
    # on SIGTERM, or written just before a hard kill).
    rt = Runtime(
        rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=ray.train.torch.get_device(),
        run_dir=loop_config["run_dir"], fit_id=loop_config["fit_id"],
        # Gradients live in DDP's buckets: no copy between them per step.
        wrap_model=lambda model: ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"gradient_as_bucket_view": True}),
        wrap_loader=lambda loader: ray.train.torch.prepare_data_loader(loader, move_to_device=False),
        report=_ray_report, log=_worker_log, extra_save_steps=frozenset(loop_config.get("extra_save_steps", ())),
        experiment=loop_config.get("experiment"),
    )
    return train_loop(cfg, loop_config["data_dir"], rt)


def build_trainer(cfg: Config, paths: RunPaths, data_dir: str, extra_callbacks: list | None = None,
                  start_timeout_s: float | None = None, extra_save_steps: tuple[int, ...] = (),
                  experiment: str | None = None):
    """A TorchTrainer for the run. Its workers' resources are waited for `start_timeout_s`
    (default run.resource_wait_s: an autoscaler may be adding nodes), then the run fails.
    `experiment`: the search the run is a trial of."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    r = cfg.run
    resources = cluster.worker_resources(cfg)
    # Read where fit() is called and passed on to the Train controller.
    cluster.set_worker_start_timeout(start_timeout_s or r.resource_wait_s)
    return TorchTrainer(
        ray_worker_loop,
        train_loop_config={"config": cfg.to_dict(), "run_dir": paths.uri, "data_dir": data_dir,
                           "fit_id": uuid.uuid4().hex, "extra_save_steps": list(extra_save_steps),
                           "experiment": experiment},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=paths.name,
            storage_path=paths.storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=r.num_to_keep, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
            # A worker group that cannot start within run.resource_wait_s fails the run instead of
            # waiting again (Ray retries it forever by default: an infeasible request would hang).
            failure_config=FailureConfig(max_failures=r.max_failures, controller_failure_limit=0),
            callbacks=extra_callbacks or None,
            # raygpt prints its own progress; Ray Train's per-report INFO lines would drown it.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


# ----------------------------------------------------------------------------- the command


def preflight(cfg: Config, resume: str | None = None, log=print,
              hash_shards: bool = False) -> tuple[RunPaths, StepPlan]:
    """Everything checked before Ray starts: the data (manifest, shards, vocabulary), the batch
    arithmetic, the run folder (new, or a resumable checkpoint of this shape on this data).
    `hash_shards` also compares local shards' content with the manifest (a full read). The
    loggers' settings left null are filled from this environment (raygpt.training.trackers)."""
    from raygpt.training import trackers

    trackers.resolve(cfg)
    data_dir = storage.resolve_storage(cfg.data.dir)
    manifest = load_manifest(data_dir)  # read once for every check below
    check_shards(manifest, data_dir, full=hash_shards)
    plan = plan_for(cfg, data_dir, manifest)
    if cfg.train.evals:  # read and tokenized here; absolute, as the workers run elsewhere
        from raygpt.multiple_choice import check_eval_data

        cfg.train.evals = [{**e, "data": storage.resolve_storage(e["data"])} for e in cfg.train.evals]
        for line in check_eval_data(cfg.train.evals, cfg.model.context_len, plan.total_steps,
                                    cfg.train.batch_size * cfg.model.context_len):
            log(line)
    if cfg.model.init_from and not resume:
        from raygpt.hf import check_init_from

        check_init_from(cfg.model)
    if resume:
        paths = resume_paths(resume, cfg.run.storage_path)
        _check_resume(paths, cfg, log, manifest)
    else:
        paths = RunPaths(check_storage_root(cfg.run.storage_path), cfg.run.name or new_run_name())
        if storage.exists(paths.uri):
            raise UserError(f"run {paths.name} already exists in {paths.storage}; "
                            f"pass --resume {paths.name} to continue it, or choose another run.name")
    return paths, plan


def train(cfg: Config, *, address: str | None = None, resume: str | None = None, log=print) -> dict[str, Any]:
    """Train `cfg` on Ray (a new run, or `resume` an existing one); return a summary dict."""
    paths, plan = preflight(cfg, resume, log)
    cfg.run.name = paths.name
    from raygpt.training import trackers

    trackers.prepare(cfg)
    with Lease(paths.uri, log=log):  # one writer per run folder, from here to the end
        return _fit(cfg, paths, plan, storage.resolve_storage(cfg.data.dir), address, log)


def _fit(cfg: Config, paths: RunPaths, plan: StepPlan, data_dir: str, address: str | None, log) -> dict[str, Any]:
    cluster.start_ray(address)
    cluster.check_resources(cfg, log)
    storage.write_text(storage.join(paths.uri, CONFIG_FILE), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    cluster.check_paths_on_nodes({"data.dir": data_dir, "run folder": paths.uri,
                                  **({"model.init_from": cfg.model.init_from} if cfg.model.init_from else {}),
                                  **{f"train.evals[{i}].data": e["data"] for i, e in enumerate(cfg.train.evals)}})
    log(f"run {paths.name}: {cfg.run.num_workers} workers, {plan.total_steps} steps of "
        f"{cfg.train.batch_size} x {cfg.model.context_len} tokens -> {paths.uri}")

    import ray.train

    try:
        result = build_trainer(cfg, paths, data_dir).fit()
    except ray.train.TrainingFailedError as exc:
        why = cluster.resources_never_came(cfg) if cluster.is_worker_start_timeout(exc) else _last_line(exc)
        raise TrainingFailed(f"training failed: {why} (run folder: {paths.uri})") from None
    metrics = result.metrics or {}
    from raygpt.training.plots import write_plot

    plot = write_plot(cfg, plan, paths.uri)
    latest = newest_complete(paths.uri)
    # run.async_save's checkpoints are not registered with Ray: the best from their state.json.
    best = (result.get_best_checkpoint("val_loss", "min").path if result.best_checkpoints
            else best_checkpoint(paths.uri)[0])
    log(f"done: {metrics.get('step')} steps, val loss {metrics.get('val_loss', float('nan')):.3f}, "
        f"{metrics.get('tokens_seen', 0):,} tokens")
    log(f"  checkpoints: {paths.uri} (latest {latest}; best {best})")
    for event in read_events(paths.uri):
        log(f"  {describe_event(event)}")
    log(f"  metrics: {storage.join(paths.uri, METRICS_FILE)}")
    log(f"  plot: {plot}")
    return {"run_dir": paths.uri, "name": paths.name, "metrics": metrics, "latest_checkpoint": latest,
            "best_checkpoint": best, "plot": plot}


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    errors = [line for line in text if "Error" in line or "Exception" in line]
    return (errors[-1] if errors else text[-1] if text else type(exc).__name__).strip()
