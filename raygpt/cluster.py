"""Every call into Ray's cluster state, in one module to audit when Ray is upgraded.

Public APIs where Ray has them (`ray.init`, `ray.nodes`, `ray.cluster_resources`, remote tasks).
Where it does not, each private call below says what it reads and which public API is missing;
Ray 2.60 is the minor these are tested against (pyproject pins `ray>=2.60,<2.61`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Iterable

from raygpt import storage
from raygpt.config import Config
from raygpt.errors import UserError

# Ray Train V2 reads this from the driver's environment (and propagates it to its controller):
# how long a worker group may wait for its resources before the run fails. No public setting.
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def start_ray(address: str | None, log=print) -> None:
    """Join the cluster at `address` ("auto" or host:port); with none, join the local Ray that
    `ray start` left running (saying so), or else start an embedded one ("local": always that)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # raygpt saves a checkpoint on SIGTERM itself; Ray Train's PreemptionWatcher is one more
    # process per run and prints an error line on every run in Ray 2.60 ("constructor arguments
    # in the object store"). Ray Train passes this on to its controller. =1 keeps it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if not sys.stdout.isatty():  # piped, or a job's log: worker lines without colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    running = running_local_ray() if address is None else None
    try:
        # "local" when nothing runs: a ray_current_cluster file left by a head that is gone would
        # otherwise make ray.init wait on a dead address.
        ray.init(address=address or running or "local", log_to_driver=True, configure_logging=False)
    except ConnectionError as exc:
        raise UserError(f"cannot connect to a Ray cluster at {address!r}: {exc}") from None
    if running is not None:
        log(f"joined the running Ray at {running} (--address local starts a private one instead)")


def running_local_ray() -> str | None:
    """The Ray that `ray.init()` with no address would join: RAY_ADDRESS, or the head that
    `ray start` recorded in <tmp>/ray/ray_current_cluster if a raylet of that head still runs
    here; None when there is none (a file whose head is gone is stale). Private: Ray's own
    lookup; no public API says whether `ray.init()` will join or start."""
    from ray._private.services import find_bootstrap_address, find_gcs_addresses

    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    recorded = find_bootstrap_address(None)
    return recorded if recorded and recorded in find_gcs_addresses() else None


def local_ray_cpus() -> int:
    """The CPUs a Ray started on this machine advertises: the container's CPU quota or cpuset when
    there is one, which can be fewer than os.cpu_count() (Ray's own detection, private)."""
    from ray._private.utils import get_num_cpus

    return int(get_num_cpus(override_docker_cpu_warning=True))


def worker_resources(cfg: Config) -> dict[str, float]:
    r = cfg.run
    return {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}


def resource_shape(resources: dict[str, float], keys: Iterable[str] | None = None) -> str:
    """'2 CPU, 1 GPU': the amounts of `keys` (default: every resource but memory) in `resources`."""
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in (keys or resources) if k != "memory")


def autoscaler_adds_nodes_of_unknown_shape() -> bool:
    """True when a V1 autoscaler (`ray up`, fake_multinode) runs: it publishes only its status,
    not its node types. A head without one runs a read-only monitor whose node types are named
    after node ids (`node_<id>`)."""
    # Private: the V1 autoscaler's status in the GCS key-value store (what `ray status` prints).
    # No public API reports an autoscaler's node types.
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
    from ray._private.state import (
        state,  # private: the autoscaler v2's node groups (no public API)
    )

    r = cfg.run
    per_worker = worker_resources(cfg)
    shapes = [(f"node {n['NodeManagerAddress']}", n["Resources"]) for n in ray.nodes() if n["Alive"]]
    groups = state.get_cluster_config()  # autoscaler v2: its node types, with their shapes
    if groups is not None:
        shapes += [(f"node type {g.name}", dict(g.resources)) for g in groups.node_group_configs if g.max_count]
    may_grow = groups is None and autoscaler_adds_nodes_of_unknown_shape()
    if not any(all(have.get(k, 0) >= v for k, v in per_worker.items()) for _, have in shapes):
        offered = "; ".join(f"{name}: {resource_shape(have, per_worker)}" for name, have in shapes)
        message = (f"each worker asks for {resource_shape(per_worker, per_worker)} (run.cpus_per_worker"
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
    from ray._private.state import (
        state,  # private: the largest cluster autoscaler v2 may build
    )

    largest = state.get_max_resources_from_cluster_config()  # None: no autoscaler v2
    if largest:
        return largest, True
    if may_grow is None:
        may_grow = autoscaler_adds_nodes_of_unknown_shape()
    return (None, True) if may_grow else (ray.cluster_resources(), False)


def resources_never_came(cfg: Config) -> str:
    import ray

    r, asked = cfg.run, worker_resources(cfg)
    return (f"the workers' resources did not come within run.resource_wait_s={r.resource_wait_s:g} s: "
            f"{r.num_workers} workers x {resource_shape(asked, asked)} asked, the cluster has "
            f"{resource_shape(ray.cluster_resources(), asked)} in all (raise run.resource_wait_s if the "
            "autoscaler needs longer to add nodes)")


def missing_here(paths: dict[str, str]) -> list[str]:
    """Which of the local paths ({what: path}; URIs are skipped) this process cannot see."""
    return [f"{what} {path}" for what, path in paths.items() if not storage.is_uri(path) and not os.path.exists(path)]


def not_shared(missing: list[str], node: str) -> UserError:
    return UserError(f"{' and '.join(missing)} not visible on node {node}: on a multi-node cluster, "
                     "put data.dir and run.storage_path on shared storage (s3://, gs://, or an NFS "
                     "mount at the same path on every node)")


def check_paths_on_nodes(paths: dict[str, str], timeout_s: float = 120.0) -> None:
    """Every live node must see the run's local paths (URIs are reachable by construction): a
    head-local folder on a multi-node cluster is caught here, before any worker starts. Nodes an
    autoscaler adds later are checked by the workers themselves (ray_worker_loop)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    local = {k: v for k, v in paths.items() if not storage.is_uri(v)}
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
            raise not_shared(missing, node)


def quiet_report_lines() -> None:
    """Ray 2.60 logs every report at INFO under a logger named by file path, which the
    LoggingConfig level does not reach; raise that one logger to WARNING."""
    import logging

    try:  # private: the module whose logger it is (no public switch for these lines)
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray without that module: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def is_worker_start_timeout(exc: BaseException) -> bool:
    """Ray Train's failure when the worker group's resources never came: no exception type of its
    own reaches the driver (a TrainingFailedError), so its text is matched."""
    return "startup timed out" in str(exc)


def set_worker_start_timeout(seconds: float) -> None:
    os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = str(seconds)
