"""MLflow and Weights & Biases as loggers (run.loggers): what they hold, read back with MLflow's
client (the reader `mlflow ui` serves from) and from W&B's own offline run files, equals the
metrics log, for a run, a resumed run and a search; and raygpt imports neither unless asked."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import make_corpus, one_line_error, search_raw, tiny_config, tiny_overrides

from raygpt.config import load_config
from raygpt.errors import UserError
from raygpt.runs import read_log
from raygpt.training import trackers

ROOT = Path(__file__).resolve().parent.parent
LOGGERS = ["run.loggers=[tensorboard,mlflow,wandb]", "run.wandb_mode=offline"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def clean_env(monkeypatch):
    """No tracker settings from the machine's environment: each test says what it uses."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "WANDB_DIR", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


# ----------------------------------------------------------------------------- reading back


def expected_values(run_dir) -> dict[str, dict[int, float]]:
    """What the metrics log says the trackers must hold: key -> step -> value, the numbers of each
    report row under their keys and of each per-step row as step/<key>."""
    values: dict[str, dict[int, float]] = {}
    for row in read_log(str(run_dir)):
        if "event" in row:
            continue
        prefix = "step/" if row.get("kind") == "step" else ""
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                values.setdefault(prefix + key, {})[row["step"]] = value
    return values


def mlflow_values(client, run_id) -> tuple[dict[str, dict[int, float]], dict[str, list[int]]]:
    """key -> step -> the value logged last at that step, and key -> every step logged (repeats kept)."""
    latest, steps = {}, {}
    for key in client.get_run(run_id).data.metrics:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))
        steps[key] = sorted(m.step for m in history)
        latest[key] = {}
        for m in history:
            latest[key][m.step] = m.value
    return latest, steps


def wandb_records(path: Path):
    """The records of a W&B run file (`run-<id>.wandb`), as W&B writes them: a 7-byte header
    (':W&B', 0xBEE1, version 0), then 32 KiB blocks of LevelDB-log chunks (crc32c, length, type:
    full / first / middle / last) that carry serialized `wandb_internal_pb2.Record`s."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_run(run_dir: Path) -> dict:
    """The W&B run of a run folder, from its offline files: every segment (one per process that
    logged it; a resume adds one), oldest first, merged as `wandb sync` uploads them."""
    ids = json.loads((run_dir / "trackers.json").read_text())
    run_id = ids["wandb"]["run_id"]
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert segments, f"no W&B offline run {run_id} in {run_dir / 'wandb'}"
    run = {"segments": len(segments), "values": {}, "config": {}, "summary": {}, "exit_codes": [], "runs": []}
    for segment in segments:
        for record in wandb_records(segment):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                run["runs"].append((r.run_id, r.project, r.run_group, r.display_name))
                run["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                for key, value in items.items():
                    if not key.startswith("_"):
                        run["values"].setdefault(key, {})[items["_step"]] = value
            elif kind == "summary":
                run["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.summary.update})
            elif kind == "exit":
                run["exit_codes"].append(record.exit.exit_code)
    return run


def assert_holds_the_log(run_dir: Path, uri: str, experiment: str, cfg) -> tuple[str, dict[str, list[int]]]:
    """MLflow's run and W&B's run of `run_dir` hold the values, config and final checkpoint of its
    metrics log and config; returns the MLflow run id and its steps per key."""
    from mlflow.tracking import MlflowClient

    expected = expected_values(run_dir)
    assert {"train_loss", "val_loss", "lr", "tokens_seen", "step/train_loss", "step/grad_norm"} <= set(expected)
    final = str(sorted(run_dir.glob("checkpoint_*"))[-1])
    params = trackers.flat_config(cfg)
    assert params["model.embedding_dim"] == 32 and params["run.loggers"] == ["tensorboard", "mlflow", "wandb"]

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                filter_string=f"attributes.run_name = '{run_dir.name}'")
    latest, steps = mlflow_values(client, run.info.run_id)
    assert latest == expected
    assert run.data.params == {key: str(value) for key, value in params.items()}
    assert run.data.tags["checkpoint"] == final and run.info.status == "FINISHED"

    wb = wandb_run(run_dir)
    assert wb["values"] == expected
    assert {run_id for run_id, *_ in wb["runs"]} == {json.loads((run_dir / "trackers.json").read_text())
                                                    ["wandb"]["run_id"]}
    assert {(project, group, name) for _, project, group, name in wb["runs"]} == {
        ("raygpt", "" if experiment == "raygpt" else experiment, run_dir.name)}
    assert {k: v for k, v in wb["config"].items() if not k.startswith("_")} == json.loads(json.dumps(params))
    assert wb["summary"]["checkpoint"] == final and wb["exit_codes"][-1] == 0
    return run.info.run_id, steps


# ----------------------------------------------------------------------------- config and launch (fast)


def test_loggers_are_checked_in_one_line():
    assert load_config(None, []).run.loggers == ["tensorboard"]
    assert load_config(None, ["run.loggers=[]"]).run.loggers == []
    for override, message in (("run.loggers=[tensorboard,neptune]", "run.loggers: unknown logger 'neptune'; choose "
                                                                      "from tensorboard, mlflow, wandb"),
                              ("run.loggers=[mlflow,wandb,mlflow]", "run.loggers lists 'mlflow' twice"),
                              ("run.wandb_mode=cloud", "run.wandb_mode must be one of online, offline, disabled")):
        with pytest.raises(UserError, match=message.replace("[", r"\[")):
            load_config(None, [override])


def test_a_missing_package_is_one_line_at_launch(data_dir, tmp_path, run_cli, clean_env):
    clean_env.setitem(sys.modules, "wandb", None)  # as if not installed: the import system finds nothing
    with pytest.raises(UserError, match=r"run.loggers has wandb but the wandb package is not installed: "
                                        r"pip install 'raygpt\[wandb\]'"):
        trackers.resolve(load_config(None, ["run.loggers=[wandb]"]))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data_dir, tmp_path / "runs").to_dict()))
    for command in (["--no-ray"], ["--check"]):
        err = one_line_error(run_cli, "train", "--config", str(config), *command, "--set", "run.loggers=[wandb]")
        assert "pip install 'raygpt[wandb]'" in err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_settings_left_null_are_read_at_launch(tmp_path, clean_env):
    cfg = load_config(None, [f"run.storage_path={tmp_path / 'runs'}", "run.loggers=[mlflow,wandb]"])
    trackers.resolve(cfg)
    assert cfg.run.mlflow_tracking_uri == f"sqlite:///{tmp_path}/runs/mlflow.db"  # MLflow's default store, by the runs
    assert (cfg.run.wandb_project, cfg.run.wandb_mode) == ("raygpt", None)
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    clean_env.setenv("WANDB_PROJECT", "gpt")
    clean_env.setenv("WANDB_MODE", "offline")
    cfg = load_config(None, ["run.loggers=[mlflow,wandb]"])
    trackers.resolve(cfg)
    assert (cfg.run.mlflow_tracking_uri, cfg.run.wandb_project, cfg.run.wandb_mode) == (
        "http://127.0.0.1:5000", "gpt", "offline")
    cfg = load_config(None, ["run.loggers=[mlflow]", "run.mlflow_tracking_uri=sqlite:///here.db"])
    trackers.resolve(cfg)  # the setting wins over the environment; relative paths made absolute
    assert cfg.run.mlflow_tracking_uri == f"sqlite:///{os.path.abspath('here.db')}"
    clean_env.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(UserError, match="run.storage_path is s3://bucket/runs, where MLflow's default store"):
        trackers.resolve(load_config(None, ["run.loggers=[mlflow]", "run.storage_path=s3://bucket/runs"]))
    nothing = load_config(None, [])
    trackers.resolve(nothing)
    assert nothing.run.mlflow_tracking_uri is None and nothing.run.wandb_project is None


def test_an_unusable_mlflow_store_is_one_line_at_launch(tmp_path, clean_env):
    # MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE opts in.
    cfg = load_config(None, ["run.loggers=[mlflow]", f"run.mlflow_tracking_uri={tmp_path / 'mlruns'}"])
    trackers.resolve(cfg)
    with pytest.raises(UserError, match=f"run.loggers has mlflow but its tracking store {tmp_path / 'mlruns'} cannot "
                                        "be used: ") as raised:
        trackers.prepare(cfg)
    assert "\n" not in str(raised.value)
    clean_env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    trackers.prepare(cfg, experiment="exp")
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=str(tmp_path / "mlruns")).get_experiment_by_name("exp") is not None


def test_what_is_logged_is_the_metrics_log():
    cfg = load_config(None, ["train.batch_size=8"])
    flat = trackers.flat_config(cfg)
    assert flat["train.batch_size"] == 8 and flat["optim.betas"] == [0.9, 0.999] and flat["schema_version"] == 1
    assert len(flat) == sum(len(section) for section in cfg.to_dict().values() if isinstance(section, dict)) + 1
    report = {"step": 4, "epoch": 0, "train_loss": 2.5, "val_loss": 3.0, "mfu": None, "final_eval": True,
              "sample": "def add", "tokens_seen": 512}
    assert trackers.row_metrics(report) == {"epoch": 0, "train_loss": 2.5, "val_loss": 3.0, "tokens_seen": 512}
    assert trackers.row_metrics({"kind": "step", "step": 3, "train_loss": 2.7, "grad_norm": 1.5}) == {
        "step/train_loss": 2.7, "step/grad_norm": 1.5}
    assert trackers.row_metrics({"event": "resume", "restored_step": 4}) == {}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_tracker_ids_live_in_the_run_folder(tmp_path, where, request):
    run_dir = str(tmp_path / "run") if where == "local" else request.getfixturevalue("bucket") + "/run"
    assert trackers.read_ids(run_dir) == {}
    trackers.write_ids(run_dir, {"mlflow": {"run_id": "abc"}, "wandb": {"run_id": "0f1e2d3c", "project": "p"}})
    assert trackers.read_ids(run_dir)["wandb"] == {"run_id": "0f1e2d3c", "project": "p"}


def test_raygpt_imports_neither_mlflow_nor_wandb_unless_asked(data_dir, tmp_path):
    code = f"""
import sys, torch
torch.set_num_threads(1)
import raygpt.cli, raygpt.training.ray_train, raygpt.search.tune, raygpt.training.trackers
from raygpt.config import load_config
from raygpt.training.local import train_without_ray
train_without_ray(load_config(None, {tiny_overrides(data_dir, tmp_path / 'runs')!r} + ["train.max_steps=4",
                  "run.name=plain"]), None)
print("imported:", sorted(m for m in ("mlflow", "wandb") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "imported: []" in proc.stdout
    assert (tmp_path / "runs" / "plain" / "checkpoint_0000004").is_dir()
    assert not (tmp_path / "runs" / "plain" / "trackers.json").exists()


# ----------------------------------------------------------------------------- runs (slow)


@pytest.mark.slow
def test_mlflow_and_wandb_hold_the_metrics_log(data_dir, tmp_path, clean_env):
    from raygpt.training.local import train_without_ray

    cfg = tiny_config(data_dir, tmp_path / "runs", *LOGGERS, "run.name=plain")
    train_without_ray(cfg, None)
    run_dir = tmp_path / "runs" / "plain"
    uri = f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert cfg.run.mlflow_tracking_uri == uri  # read at launch: the default store beside the runs
    _, steps = assert_holds_the_log(run_dir, uri, "raygpt", cfg)
    assert steps["val_loss"] == [0, 4, 8, 12] and steps["step/grad_norm"] == list(range(1, 13))  # each step once
    assert (run_dir / "wandb").is_dir() and list(run_dir.glob("events.out.tfevents.*"))  # TensorBoard too


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_mlflow_and_wandb_runs(data_dir, tmp_path, clean_env):
    from mlflow.tracking import MlflowClient

    from raygpt.training.local import train_without_ray
    from raygpt.training.recovery import InjectedFault

    # MLflow's file store this time (as `mlflow ui --backend-store-uri DIR` reads it).
    clean_env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = str(tmp_path / "mlruns")
    # Reports at 0, 2, 4, 6; a checkpoint at 4; a crash after step 6: the resume restarts from 4 and
    # logs steps 5 and 6 again.
    cfg = tiny_config(data_dir, tmp_path / "runs", *LOGGERS, f"run.mlflow_tracking_uri={store}", "run.name=r",
                      "train.eval_freq=2", "train.save_freq=4", "fault.crash_at_step=6")
    with pytest.raises(InjectedFault):
        train_without_ray(cfg, None)
    run_dir = tmp_path / "runs" / "r"
    ids = json.loads((run_dir / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(ids["mlflow"]["run_id"]).info.status == "FAILED"
    assert wandb_run(run_dir)["exit_codes"] == [1]

    train_without_ray(cfg, "r")
    assert json.loads((run_dir / "trackers.json").read_text()) == ids  # the same runs, continued
    run_id, steps = assert_holds_the_log(run_dir, store, "raygpt", cfg)
    assert run_id == ids["mlflow"]["run_id"]
    assert len(client.search_runs([ids["mlflow"]["experiment_id"]])) == 1
    # The recomputed steps were logged twice; the later value is the one in metrics.jsonl.
    assert steps["val_loss"] == [0, 2, 4, 6, 6, 8, 10, 12]
    assert steps["step/train_loss"] == [1, 2, 3, 4, 5, 5, 6, 6, 7, 8, 9, 10, 11, 12]
    wb = wandb_run(run_dir)
    assert wb["segments"] == 2 and wb["exit_codes"] == [1, 0]


@pytest.mark.slow
def test_a_searchs_trials_are_runs_grouped_by_its_experiment(ray_address, data_dir, tmp_path, run_cli, clean_env):
    from mlflow.tracking import MlflowClient

    raw = search_raw(data_dir, tmp_path / "runs", {"optim.peak_lr": {"grid": [0.002, 0.005]}}, name="exp",
                     early_stopping=False)
    raw["run"].update(loggers=["mlflow", "wandb"], wandb_mode="offline")
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(raw))
    code, out, err = run_cli("tune", "--config", str(tmp_path / "search.yaml"), "--address", ray_address)
    assert code == 0, err
    uri = f"sqlite:///{tmp_path}/runs/mlflow.db"
    saved = yaml.safe_load((tmp_path / "runs" / "exp" / "search.yaml").read_text())
    assert saved["run"]["mlflow_tracking_uri"] == uri and saved["run"]["wandb_mode"] == "offline"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("exp")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["train-00000", "train-00001"]
    for run_dir in sorted((tmp_path / "runs" / "exp").glob("train-*")):
        steps = assert_holds_the_log_of_trial(run_dir, uri, load_config(run_dir / "config.yaml"))
        assert steps["val_loss"] == [0, 2, 4, 6, 8, 10, 12]


def assert_holds_the_log_of_trial(run_dir: Path, uri: str, cfg) -> dict[str, list[int]]:
    """A trial's MLflow run (experiment = the search's name) and W&B run (group = the search's
    name) hold its metrics log, config and final checkpoint."""
    from mlflow.tracking import MlflowClient

    expected = expected_values(run_dir)
    final = str(sorted(run_dir.glob("checkpoint_*"))[-1])
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id],
                                filter_string=f"attributes.run_name = '{run_dir.name}'")
    latest, steps = mlflow_values(client, run.info.run_id)
    assert latest == expected
    assert run.data.params == {key: str(value) for key, value in trackers.flat_config(cfg).items()}
    assert run.data.tags["checkpoint"] == final and run.info.status == "FINISHED"
    wb = wandb_run(run_dir)
    assert wb["values"] == expected and wb["summary"]["checkpoint"] == final and wb["exit_codes"] == [0]
    assert {(project, group, name) for _, project, group, name in wb["runs"]} == {("raygpt", "exp", run_dir.name)}
    return steps
