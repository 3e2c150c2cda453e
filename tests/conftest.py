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


@pytest.fixture(scope="session")
def ray_address():
    """One real local Ray head for the whole test session (dashboard on, token auth on), started
    with `ray start --head --block` and stopped by its PID (never `ray stop`, which would hit
    every Ray on the machine). This process is connected to it; the address is yielded."""
    import ray

    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], check=True, capture_output=True)
    temp_dir = tempfile.mkdtemp(prefix="raygpt-ray-")
    port, dashboard_port = _free_port(), _free_port()
    log = open(Path(temp_dir) / "head.log", "w")
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            ray.init(address=address, log_to_driver=True)
            break
        except Exception:
            if head.poll() is not None or time.time() > deadline:
                log.close()
                raise RuntimeError(f"ray head did not start: {(Path(temp_dir) / 'head.log').read_text()[-2000:]}")
            time.sleep(1)
    try:
        yield address
    finally:
        ray.shutdown()
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        for stale in (Path(temp_dir) / "ray_current_cluster", Path("/tmp/ray/ray_current_cluster")):
            stale.unlink(missing_ok=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
