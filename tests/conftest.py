import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Token auth on for every Ray client in the session; must be set before anything imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

from raygpt.bench.checkpoint import TEST_CREDENTIALS, start_moto_server  # noqa: E402
from raygpt.cli import main  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.fixture
def run_cli(capsys):
    """Run `raygpt ARGS...` in-process; return (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what the test printed before
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """A real Ray head, `ray start --head --block` in the background, stopped by its PID (never
    `ray stop`, which would hit every Ray on the machine). Everything it started (fake nodes of an
    autoscaler included) runs with its own temp dir on the command line, so `stop` can find and
    end whatever outlived the head."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, num_cpus: int = 2,
                 autoscaling_config: dict | None = None):
        subprocess.run([BIN / "ray", "get-auth-token", "--generate"], check=True, capture_output=True)
        self.temp_dir = tempfile.mkdtemp(prefix="raygpt-ray-")
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        if autoscaling_config is not None:  # a fake multi-node cluster: the provider needs the GCS address
            autoscaling_config["provider"]["gcs_address"] = self.address
            config_path = Path(self.temp_dir) / "autoscaling.json"
            config_path.write_text(json.dumps(autoscaling_config))
            args = (*args, f"--autoscaling-config={config_path}")
            env = {"RAY_FAKE_CLUSTER": "1", **(env or {})}
        self.log_path = Path(self.temp_dir) / "head.log"
        self._log = open(self.log_path, "w")
        # The venv's bin first: a job's `python` is the one with raygpt, as on a set-up cluster.
        self.env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        self.proc = subprocess.Popen(
            [BIN / "ray", "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1",
             f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
             # Its own agent port: another Ray on the machine (a bench, a user's) holds the default
             # 52365, and a head whose agent cannot bind it answers every job submission with 500.
             f"--dashboard-agent-listen-port={_free_port()}", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )

    def connect(self, timeout_s: float = 90) -> None:
        """Connect this process (ray.init) once the head answers."""
        import ray

        deadline = time.time() + timeout_s
        while True:
            try:
                ray.init(address=self.address, log_to_driver=True)
                return
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"ray head did not start: {self.log_path.read_text()[-2000:]}")
                time.sleep(1)

    def leftover_pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if self.temp_dir.encode() in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    def stop(self) -> None:
        import ray

        ray.shutdown()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self._log.close()
        for stale in (Path(self.temp_dir) / "ray_current_cluster", Path("/tmp/ray/ray_current_cluster")):
            stale.unlink(missing_ok=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


_session_head: list[RayHead] = []


def stop_session_ray() -> None:
    """Tests that start a Ray of their own (marked `own_ray`, run last) stop the shared one first:
    two Ray instances on one machine break each other's Train/Tune cleanup."""
    while _session_head:
        _session_head.pop().stop()


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.get_closest_marker("own_ray") is not None)  # stable: order kept otherwise


S3_ENV = TEST_CREDENTIALS


@pytest.fixture(scope="session")
def s3_server():
    """An S3 API on loopback (moto's server) for the whole session, or None without moto. Its
    address and test credentials go into this process's environment before the session's Ray
    starts (ray_head depends on this), so Ray's workers reach it as a cluster's would: through
    AWS_ENDPOINT_URL."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        yield None
        return
    proc, endpoint = start_moto_server(Path(tempfile.mkdtemp(prefix="raygpt-moto-")) / "moto.log")
    env = {"AWS_ENDPOINT_URL": endpoint, **S3_ENV}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def bucket(s3_server):
    """A new, empty bucket on the session's S3 API: its URI, s3://NAME."""
    if s3_server is None:
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    import uuid

    import boto3

    name = f"raygpt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_head(s3_server):
    """One real local Ray head for the whole test session (dashboard on 127.0.0.1, token auth on);
    this process is connected to it. Started after the S3 API, so its workers see it."""
    head = RayHead()
    head.connect()
    _session_head.append(head)
    try:
        yield head
    finally:
        stop_session_ray()


@pytest.fixture(scope="session")
def ray_address(ray_head):
    return ray_head.address
