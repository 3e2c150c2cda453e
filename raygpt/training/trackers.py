"""The run's loggers (`run.loggers`): TensorBoard, MLflow and Weights & Biases, each fed by rank 0
with the rows of `metrics.jsonl` as they are written.

MLflow and W&B get the same values as the metrics log: every number of a report row under its
metrics.jsonl key (train_loss, val_loss, lr, tokens_seen, tokens_per_s, mfu, ...) and of a light
per-step row under `step/<key>` (step/train_loss, step/grad_norm, ...), at the row's step; the
config once, as flattened `section.key` params; and, when the run ends, the final checkpoint's
URI (MLflow tag / W&B summary `checkpoint`). A search's trials are runs of one group: the MLflow
experiment and the W&B group are the search's name (a plain run goes to MLflow experiment
`raygpt`, no W&B group); each run is named after its run folder.

The MLflow and W&B run ids are kept in the run folder (`trackers.json`), so a resumed run, a
restarted worker group or a resumed trial continues the same MLflow / W&B run instead of starting
another. A resumed run re-trains the steps after its checkpoint and logs them again: MLflow keeps
every value logged at a step (the later one last), W&B offline writes the resumed part as a new
segment of the same run id, so the latest value logged at each step is the one metrics.jsonl
holds. (W&B online only moves forward: it drops what is logged at a step it already has, so
those steps keep the values first logged there.)

mlflow and wandb are imported here only, and only when a run asks for them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import time
from typing import Any, Protocol

from raygpt import storage
from raygpt.config import Config, RunConfig
from raygpt.errors import UserError
from raygpt.runs import TRACKERS_FILE, is_step_row
from raygpt.training.runtime import Runtime

MLFLOW_DB = "mlflow.db"  # the default MLflow store: a SQLite database in the storage root
DEFAULT_EXPERIMENT = "raygpt"  # the MLflow experiment of runs that are not trials of a search
DEFAULT_PROJECT = "raygpt"  # the W&B project when neither run.wandb_project nor $WANDB_PROJECT names one
CHECKPOINT_KEY = "checkpoint"  # the final checkpoint's URI: an MLflow tag, a W&B summary value
PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}  # logger -> the module it needs (and the raygpt extra)
RESOLVED = ("mlflow_tracking_uri", "wandb_project", "wandb_mode")  # run.* keys `resolve` fills at launch


class Logger(Protocol):
    def add(self, row: dict[str, Any], flush: bool = True) -> None: ...

    def finish(self, checkpoint: str | None) -> None: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------- at launch


def check_installed(loggers: list[str]) -> None:
    """Every package `loggers` needs can be imported (nothing is imported to find out)."""
    for name in loggers:
        module = PACKAGES.get(name)
        if module is not None and importlib.util.find_spec(module) is None:
            raise UserError(f"run.loggers has {name} but the {module} package is not installed: "
                            f"pip install 'raygpt[{name}]'")


def mlflow_tracking_uri(run: RunConfig) -> str:
    """run.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else a SQLite database in the storage
    root (MLflow's own default store, beside the runs instead of in the current folder); local
    paths made absolute, as the workers' current folders differ."""
    uri = run.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
        return uri if ":" in uri else os.path.abspath(uri)  # a bare folder: a file store
    root = storage.resolve_storage(run.storage_path)
    if storage.is_uri(root):
        raise UserError(f"run.loggers has mlflow but run.storage_path is {root}, where MLflow's default store (a "
                        f"SQLite file beside the runs) cannot be; set run.mlflow_tracking_uri (or "
                        f"MLFLOW_TRACKING_URI) to a tracking server or a database")
    return "sqlite:///" + os.path.join(root, MLFLOW_DB)


def resolve(cfg: Config) -> None:
    """At launch, before the config is saved: the loggers' packages are installed, and their
    settings left null are filled from this environment, so every worker and every resume logs
    to the same place."""
    r = cfg.run
    check_installed(r.loggers)
    if "mlflow" in r.loggers:
        r.mlflow_tracking_uri = mlflow_tracking_uri(r)
    if "wandb" in r.loggers:
        r.wandb_project = r.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        if r.wandb_mode is None and os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
            r.wandb_mode = os.environ["WANDB_MODE"]


def prepare(cfg: Config, experiment: str | None = None) -> None:
    """At launch, on the driver: MLflow's store opened (a new SQLite database created once, not
    by trials starting at once) and its experiment created, so a store that cannot be used is
    one line now rather than an error in a worker."""
    if "mlflow" not in cfg.run.loggers:
        return
    uri = mlflow_tracking_uri(cfg.run)
    try:
        mlflow_experiment(mlflow_client(uri), experiment or DEFAULT_EXPERIMENT)
    except UserError:
        raise
    except Exception as exc:  # MLflow's and its store's errors, whatever they are: said in one line
        raise UserError(f"run.loggers has mlflow but its tracking store {uri} cannot be used: "
                        f"{_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- what is logged


def flat_config(cfg: Config) -> dict[str, Any]:
    """The config as `section.key` -> value (schema_version as it is)."""
    flat: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def row_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics log row under the names the trackers log them by: a report row's
    under their own keys, a per-step row's as `step/<key>`; none for an event. The step is the
    x-axis, not a metric; booleans and text (the sample) are left out."""
    if "event" in row:
        return {}
    prefix = "step/" if is_step_row(row) else ""
    return {prefix + key: value for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def read_ids(run_dir: str) -> dict[str, Any]:
    """The run's tracker ids (`trackers.json`): {} when there are none (or they do not read)."""
    try:
        ids = json.loads(storage.read_text(storage.join(run_dir, TRACKERS_FILE)))
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def write_ids(run_dir: str, ids: dict[str, Any]) -> None:
    storage.write_text(storage.join(run_dir, TRACKERS_FILE), json.dumps(ids, indent=1, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- the loggers


def open_loggers(cfg: Config, rt: Runtime, history: list[dict[str, Any]]) -> list[Logger]:
    """Rank 0's loggers for the run folder `rt.run_dir`, in run.loggers order; `history` is the
    metrics log so far (empty for a new run, the rows up to the checkpoint on resume)."""
    loggers: list[Logger] = []
    try:
        for name in cfg.run.loggers:
            if name == "tensorboard":
                from raygpt.training.tensorboard_log import TensorBoardLog

                loggers.append(TensorBoardLog(rt.run_dir, history))
            elif name == "mlflow":
                loggers.append(MlflowLog(cfg, rt, history))
            elif name == "wandb":
                loggers.append(WandbLog(cfg, rt, history))
    except BaseException:
        for logger in loggers:
            logger.close()
        raise
    return loggers


def run_name(rt: Runtime) -> str:
    return rt.run_dir.rstrip("/").rsplit("/", 1)[-1]


def mlflow_client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):  # SQLite creates the database file, not its folder
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]), exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def mlflow_experiment(client: Any, name: str) -> str:
    """The id of the MLflow experiment `name`, created if missing (by whichever trial comes first)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # created meanwhile by another trial
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise UserError(f"MLflow experiment {name!r} is deleted in {client.tracking_uri}: restore it "
                        f"(mlflow experiments restore --experiment-id {found.experiment_id}) or delete it for good")
    return found.experiment_id


class MlflowLog:
    """An MLflow run, through MlflowClient (no global active run: a trial's process may host
    another later). Per-step rows are sent with the next report, in batches."""

    def __init__(self, cfg: Config, rt: Runtime, history: list[dict[str, Any]]):
        from mlflow.exceptions import MlflowException

        self.run_dir, self.log = rt.run_dir, rt.log
        self.uri = mlflow_tracking_uri(cfg.run)
        self.client = mlflow_client(self.uri)
        self.pending: list[Any] = []
        self.finished = False
        ids = read_ids(rt.run_dir)
        stored = ids.get("mlflow") if isinstance(ids.get("mlflow"), dict) else {}
        self.run_id = None
        if stored.get("run_id") and stored.get("tracking_uri") == self.uri:
            try:
                run = self.client.get_run(stored["run_id"])
                if run.info.lifecycle_stage != "deleted":
                    self.run_id = run.info.run_id
            except MlflowException:
                pass
            if self.run_id is None:
                self.log(f"warning: MLflow run {stored['run_id']} is gone from {self.uri}: starting a new one")
        params = {key: str(value) for key, value in flat_config(cfg).items()}
        if self.run_id is not None:  # a resume: the same run, running again
            self.client.update_run(self.run_id, status="RUNNING")
            kept = self.client.get_run(self.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in kept and kept[k] != v)
            if changed:
                self.log(f"warning: MLflow run {self.run_id} keeps its first {', '.join(changed)} "
                         "(MLflow params never change)")
            self._log_params({k: v for k, v in params.items() if k not in kept})
            return
        experiment = mlflow_experiment(self.client, rt.experiment or DEFAULT_EXPERIMENT)
        run = self.client.create_run(experiment, run_name=run_name(rt), tags={"raygpt.run_dir": rt.run_dir})
        self.run_id = run.info.run_id
        write_ids(rt.run_dir, {**ids, "mlflow": {"run_id": self.run_id, "experiment_id": experiment,
                                                 "tracking_uri": self.uri}})
        self._log_params(params)
        for row in history:  # a run whose loggers gained mlflow on resume: its log so far
            self.add(row, flush=False)
        self._flush()

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def add(self, row: dict[str, Any], flush: bool = True) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(key, value, now, row["step"]) for key, value in row_metrics(row).items()]
        if flush:
            self._flush()

    def _flush(self) -> None:
        for i in range(0, len(self.pending), 1000):  # MLflow takes at most 1,000 metrics per batch
            self.client.log_batch(self.run_id, metrics=self.pending[i:i + 1000])
        self.pending = []

    def finish(self, checkpoint: str | None) -> None:
        self._flush()
        if checkpoint:
            self.client.set_tag(self.run_id, CHECKPOINT_KEY, checkpoint)
        self.finished = True

    def close(self) -> None:
        try:
            self._flush()
        finally:
            self.client.set_terminated(self.run_id, "FINISHED" if self.finished else "FAILED")


class WandbLog:
    """A W&B run. Its id is chosen here and stored before `wandb.init`, so a process killed at any
    point is continued by its resume. W&B's local files go to $WANDB_DIR, else into the run folder
    (`wandb/`, where `wandb sync` finds an offline run), else (a storage URI) W&B's default."""

    def __init__(self, cfg: Config, rt: Runtime, history: list[dict[str, Any]]):
        import wandb

        self.finished = False
        ids = read_ids(rt.run_dir)
        project = cfg.run.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        stored = ids.get("wandb") if isinstance(ids.get("wandb"), dict) else {}
        resumed = bool(stored.get("run_id")) and stored.get("project") == project
        run_id = stored["run_id"] if resumed else secrets.token_hex(4)
        if not resumed:
            write_ids(rt.run_dir, {**ids, "wandb": {"run_id": run_id, "project": project}})
        folder = None
        if not os.environ.get("WANDB_DIR") and not storage.is_uri(rt.run_dir):
            folder = rt.run_dir
            os.makedirs(folder, exist_ok=True)
        self.run = wandb.init(project=project, id=run_id, resume="allow", name=run_name(rt), group=rt.experiment,
                              config=flat_config(cfg), allow_val_change=True, mode=cfg.run.wandb_mode, dir=folder,
                              reinit="create_new")
        if not resumed:
            for row in history:  # a run whose loggers gained wandb on resume: its log so far
                self.add(row)

    def add(self, row: dict[str, Any], flush: bool = True) -> None:
        metrics = row_metrics(row)
        if metrics:
            self.run.log(metrics, step=row["step"])

    def finish(self, checkpoint: str | None) -> None:
        if checkpoint:
            self.run.summary[CHECKPOINT_KEY] = checkpoint
        self.finished = True

    def close(self) -> None:
        self.run.finish(exit_code=0 if self.finished else 1)
