"""Ray Train around the loop: a TorchTrainer with DDP workers, shared checkpoint storage,
failure handling and resume. The Ray-specific code is here and only here."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import yaml

from raygpt import checkpoint as ckpt
from raygpt.config import Config, apply_overrides, config_from_dict
from raygpt.errors import TrainingFailed, UserError
from raygpt.loop import METRICS_FILE, Runtime, StepPlan, plan_for, read_events, read_metrics, train_loop
from raygpt.recovery import describe
from raygpt.schedule import warmup_cosine_lr

CONFIG_FILE = "config.yaml"
PLOT_FILE = "loss.png"


@dataclass
class RunPaths:
    storage: str  # absolute folder or URI
    name: str

    @property
    def uri(self) -> str:
        return ckpt.join(self.storage, self.name)


# ----------------------------------------------------------------------------- runs and configs


def new_run_name() -> str:
    return f"raygpt-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def resume_paths(resume: str, storage_path: str) -> RunPaths:
    """`--resume` takes a run name (under the storage path) or a run folder / URI."""
    if ckpt.is_uri(resume) or os.sep in resume or os.path.isdir(resume):
        uri = ckpt.resolve_storage(resume).rstrip("/")
        storage, _, name = uri.rpartition("/")
        return RunPaths(storage, name)
    return RunPaths(ckpt.resolve_storage(storage_path), resume)


def run_config(paths: RunPaths, overrides: list[str]) -> Config:
    """The config a run was started with (saved in its folder), with `--set` overrides."""
    uri = ckpt.join(paths.uri, CONFIG_FILE)
    if not ckpt.exists(uri):
        raise UserError(f"no run to resume at {paths.uri} (no {CONFIG_FILE}); check the name or storage_path")
    return config_from_dict(apply_overrides(yaml.safe_load(ckpt.read_text(uri)), overrides))


def latest_checkpoint(run_uri: str) -> str | None:
    """The newest checkpoint folder of a run that has its state.json (complete)."""
    for uri in reversed(ckpt.list_checkpoints(run_uri)):
        if ckpt.exists(ckpt.join(uri, "state.json")):
            return uri
    return None


def _check_resume(paths: RunPaths, cfg: Config) -> None:
    latest = latest_checkpoint(paths.uri)
    if latest is None:
        raise UserError(f"run {paths.name} has no checkpoint to resume from ({paths.uri})")
    state = json.loads(ckpt.read_text(ckpt.join(latest, "state.json")))
    ckpt.check_same_shape(state["config"]["model"], cfg.model, latest)


# ----------------------------------------------------------------------------- Ray


def start_ray(address: str | None) -> None:
    """Join the cluster at `address` ("auto" or host:port), or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    except ConnectionError as exc:
        raise UserError(f"cannot connect to a Ray cluster at {address!r}: {exc}") from None


def worker_resources(cfg: Config) -> dict[str, float]:
    r = cfg.run
    return {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}


def _shape(resources: dict[str, float], keys) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in keys)


def autoscaler_adds_nodes_of_unknown_shape() -> bool:
    """True when a V1 autoscaler (`ray up`, fake_multinode) runs: it publishes only its status,
    not its node types. A head without one runs a read-only monitor whose node types are named
    after node ids (`node_<id>`)."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(status) if status else {}).get("autoscaler_report") or {}
    return any(not name.startswith("node_") for name in (report.get("node_type_mapping") or {}).values())


def check_resources(cfg: Config, log=print) -> None:
    """Fail at once when the run can never fit: one worker larger than every node (and every node
    type an autoscaler can add), or all of them more than the cluster can ever hold. When an
    autoscaler may add nodes, Ray Train waits at most run.resource_wait_s for them (see
    build_trainer), then the run fails naming what it asked for."""
    import ray
    from ray._private.state import state

    r = cfg.run
    per_worker = worker_resources(cfg)
    shapes = [(f"node {n['NodeManagerAddress']}", n["Resources"]) for n in ray.nodes() if n["Alive"]]
    groups = state.get_cluster_config()  # autoscaler v2: its node types, with their shapes
    if groups is not None:
        shapes += [(f"node type {g.name}", dict(g.resources)) for g in groups.node_group_configs if g.max_count]
    may_grow = groups is None and autoscaler_adds_nodes_of_unknown_shape()
    if not any(all(have.get(k, 0) >= v for k, v in per_worker.items()) for _, have in shapes):
        offered = "; ".join(f"{name}: {_shape(have, per_worker)}" for name, have in shapes)
        message = (f"each worker asks for {_shape(per_worker, per_worker)} (run.cpus_per_worker"
                   f"{', run.gpus_per_worker' if r.use_gpu else ''}) but no node offers that ({offered})")
        if not may_grow:
            raise UserError(message)
        log(f"{message}; waiting up to run.resource_wait_s={r.resource_wait_s:g} s for the autoscaler")
    have, grows = cluster_capacity(may_grow)
    if have is not None:
        for resource, amount in per_worker.items():
            if amount * r.num_workers > have.get(resource, 0):
                kind = "can grow to at most" if grows else "has"
                raise UserError(
                    f"the run asks for {amount * r.num_workers:g} {resource} ({r.num_workers} workers x "
                    f"{amount:g}) but the cluster {kind} {have.get(resource, 0):g} {resource}"
                )


def cluster_capacity(may_grow: bool | None = None) -> tuple[dict[str, float] | None, bool]:
    """The most resources the cluster can ever hold, and whether that is more than it has now:
    an autoscaler v2's largest shape, the cluster as it is when nothing adds nodes, or None when
    a V1 autoscaler may add nodes of shapes it does not publish."""
    import ray
    from ray._private.state import state

    largest = state.get_max_resources_from_cluster_config()  # None: no autoscaler v2
    if largest:
        return largest, True
    if may_grow is None:
        may_grow = autoscaler_adds_nodes_of_unknown_shape()
    return (None, True) if may_grow else (ray.cluster_resources(), False)


def _resources_never_came(cfg: Config) -> str:
    import ray

    r, asked = cfg.run, worker_resources(cfg)
    return (f"the workers' resources did not come within run.resource_wait_s={r.resource_wait_s:g} s: "
            f"{r.num_workers} workers x {_shape(asked, asked)} asked, the cluster has "
            f"{_shape(ray.cluster_resources(), asked)} in all (raise run.resource_wait_s if the "
            "autoscaler needs longer to add nodes)")


def missing_here(paths: dict[str, str]) -> list[str]:
    """Which of the local paths ({what: path}; URIs are skipped) this process cannot see."""
    return [f"{what} {path}" for what, path in paths.items() if not ckpt.is_uri(path) and not os.path.exists(path)]


def _not_shared(missing: list[str], node: str) -> UserError:
    return UserError(f"{' and '.join(missing)} not visible on node {node}: on a multi-node cluster, "
                     "put data.dir and run.storage_path on shared storage (s3://, gs://, or an NFS "
                     "mount at the same path on every node)")


def check_paths_on_nodes(paths: dict[str, str], timeout_s: float = 120.0) -> None:
    """Every live node must see the run's local paths (URIs are reachable by construction): a
    head-local folder on a multi-node cluster is caught here, before any worker starts. Nodes an
    autoscaler adds later are checked by the workers themselves (ray_worker_loop)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    local = {k: v for k, v in paths.items() if not ckpt.is_uri(v)}
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if not local or (len(nodes) <= 1 and not missing_here(local)):
        return  # one node, and this process (on it) sees the paths
    check = ray.remote(num_cpus=0)(missing_here)
    refs = {n["NodeManagerAddress"]: check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(local) for n in nodes}
    for node, ref in refs.items():
        try:
            missing = ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"node {node} did not answer a path check within {timeout_s:g} s") from None
        if missing:
            raise _not_shared(missing, node)


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


def _quiet_report_lines() -> None:
    """Ray 2.60 logs every report at INFO under a logger named by file path, which the
    LoggingConfig level does not reach; raise that one logger to WARNING."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray without that module: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def ray_worker_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker: thin wiring from Ray to the plain loop."""
    import ray.train
    import ray.train.torch
    import torch

    cfg = config_from_dict(loop_config["config"])
    _quiet_report_lines()
    missing = missing_here({"data.dir": loop_config["data_dir"], "run folder": loop_config["run_dir"]})
    if missing:  # a node the autoscaler added after the driver's check, without the shared mount
        raise _not_shared(missing, ray.util.get_node_ip_address())
    torch.set_num_threads(max(1, int(cfg.run.cpus_per_worker)))
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
    )
    return train_loop(cfg, loop_config["data_dir"], rt)


def build_trainer(cfg: Config, paths: RunPaths, data_dir: str, extra_callbacks: list | None = None,
                  start_timeout_s: float | None = None, extra_save_steps: tuple[int, ...] = ()):
    """A TorchTrainer for the run. Its workers' resources are waited for `start_timeout_s`
    (default run.resource_wait_s: an autoscaler may be adding nodes), then the run fails."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig
    from ray.train.torch import TorchTrainer

    r = cfg.run
    resources = worker_resources(cfg)
    # Read where fit() is called and passed on to the Train controller.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(start_timeout_s or r.resource_wait_s)
    return TorchTrainer(
        ray_worker_loop,
        train_loop_config={"config": cfg.to_dict(), "run_dir": paths.uri, "data_dir": data_dir,
                           "fit_id": uuid.uuid4().hex, "extra_save_steps": list(extra_save_steps)},
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


def lr_schedule(cfg: Config, plan: StepPlan) -> list[float]:
    o = cfg.optim
    return [warmup_cosine_lr(s, plan.total_steps, o.warmup_steps, o.initial_lr, o.peak_lr, o.min_lr)
            for s in range(plan.total_steps)]


def write_plot(cfg: Config, plan: StepPlan, run_uri: str) -> str:
    from raygpt.plots import plot_run

    rows = read_metrics(run_uri)
    target = ckpt.join(run_uri, PLOT_FILE)
    if ckpt.is_uri(run_uri):
        with ckpt.temporary_dir() as tmp:
            local = plot_run(rows, lr_schedule(cfg, plan), os.path.join(tmp, PLOT_FILE))
            with open(local, "rb") as f:
                fs, path = ckpt.filesystem(target)
                with fs.open_output_stream(path) as out:
                    out.write(f.read())
        return target
    return plot_run(rows, lr_schedule(cfg, plan), target)


def train(cfg: Config, *, address: str | None = None, resume: str | None = None, log=print) -> dict[str, Any]:
    """Train `cfg` on Ray (a new run, or `resume` an existing one); return a summary dict."""
    data_dir = ckpt.resolve_storage(cfg.data.dir)
    plan = plan_for(cfg, data_dir)  # validates data and batch arithmetic before Ray starts
    if resume:
        paths = resume_paths(resume, cfg.run.storage_path)
        _check_resume(paths, cfg)
    else:
        paths = RunPaths(ckpt.resolve_storage(cfg.run.storage_path), cfg.run.name or new_run_name())
        if ckpt.exists(paths.uri):
            raise UserError(f"run {paths.name} already exists in {paths.storage}; "
                            f"pass --resume {paths.name} to continue it, or choose another run.name")
    cfg.run.name = paths.name
    start_ray(address)
    check_resources(cfg, log)
    ckpt.write_text(ckpt.join(paths.uri, CONFIG_FILE), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    check_paths_on_nodes({"data.dir": data_dir, "run folder": paths.uri})
    log(f"run {paths.name}: {cfg.run.num_workers} workers, {plan.total_steps} steps of "
        f"{cfg.train.batch_size} x {cfg.model.context_len} tokens -> {paths.uri}")

    import ray.train

    try:
        result = build_trainer(cfg, paths, data_dir).fit()
    except ray.train.TrainingFailedError as exc:
        why = _resources_never_came(cfg) if "startup timed out" in str(exc) else _last_line(exc)
        raise TrainingFailed(f"training failed: {why} (run folder: {paths.uri})") from None
    metrics = result.metrics or {}
    plot = write_plot(cfg, plan, paths.uri)
    latest = latest_checkpoint(paths.uri)
    best = result.get_best_checkpoint("val_loss", "min") if result.best_checkpoints else None
    log(f"done: {metrics.get('step')} steps, val loss {metrics.get('val_loss', float('nan')):.3f}, "
        f"{metrics.get('tokens_seen', 0):,} tokens")
    log(f"  checkpoints: {paths.uri} (latest {latest}; best {best.path if best else None})")
    for event in read_events(paths.uri):
        log(f"  {describe(event)}")
    log(f"  metrics: {ckpt.join(paths.uri, METRICS_FILE)}")
    log(f"  plot: {plot}")
    return {"run_dir": paths.uri, "name": paths.name, "metrics": metrics, "latest_checkpoint": latest,
            "best_checkpoint": best.path if best else None, "plot": plot}


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    errors = [line for line in text if "Error" in line or "Exception" in line]
    return (errors[-1] if errors else text[-1] if text else type(exc).__name__).strip()
