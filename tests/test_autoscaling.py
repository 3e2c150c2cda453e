"""Autoscaling on Ray's fake multi-node provider (slow; runs last with a head of its own).

A head with 1 CPU and an autoscaler that may add up to two 2-CPU worker nodes: a 2-worker raygpt
job does not fit the head, so the autoscaler must add a node, the job must finish on it, and the
node must go away after the idle timeout. `ray.cluster_utils.AutoscalingCluster` is broken in Ray
2.60 (see RAY-NOTES), so the head is started as the docs describe, with RAY_FAKE_CLUSTER=1.
"""

import sys
import time
from pathlib import Path

import pytest
from conftest import RayHead, stop_session_ray
from helpers import make_corpus, tiny_overrides

from raygpt.runs import read_metrics

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]


def fake_cluster_config() -> dict:
    empty: list = []
    return {
        "cluster_name": "raygpt-fake", "max_workers": 2, "idle_timeout_minutes": 0.2, "upscaling_speed": 1.0,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "head_node_type": "ray.head.default",  # the fake provider requires this name
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": empty,
        "file_mounts_sync_continuously": False, "rsync_exclude": empty, "rsync_filter": empty,
        "initialization_commands": empty, "setup_commands": empty, "head_setup_commands": empty,
        "worker_setup_commands": empty, "head_start_ray_commands": empty, "worker_start_ray_commands": empty,
    }


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


def test_a_run_larger_than_the_head_scales_the_cluster_up_then_down(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    stop_session_ray()  # never two Rays on one machine
    data_dir = make_corpus(tmp_path / "corpus")
    head = RayHead(num_cpus=1, autoscaling_config=fake_cluster_config(),
                   env={"AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    try:
        head.connect()
        assert alive_nodes() == 1
        client = JobSubmissionClient(head.dashboard_url)

        def run_job(*extra: str, timeout_s: float = 400) -> tuple[JobStatus, str, int, float]:
            """Submit the pretrain job; return its end status, logs, the most nodes seen, seconds."""
            # No working_dir on the fake cluster: every fake node would re-extract it in the shared
            # session folder under running workers (RAY-NOTES); the package is installed in the venv.
            job = client.submit_job(entrypoint=" ".join(
                ["python", str(REPO / "jobs" / "pretrain.py"), "--config", str(REPO / "jobs" / "pretrain.yaml")]
                + [f"--set {o}" for o in tiny_overrides(data_dir, tmp_path / "runs") + ["run.num_workers=2", *extra]]))
            start = time.time()
            most = 1
            while time.time() < start + timeout_s:
                most = max(most, alive_nodes())
                status = client.get_job_status(job)
                if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                    break
                time.sleep(1)
            return status, client.get_job_logs(job), most, time.time() - start

        # No node type has a GPU: the run waits its resource_wait_s for the autoscaler, then fails
        # naming what it asked for (Ray would otherwise retry the start forever).
        status, logs, _, took = run_job("run.name=gpu", "run.use_gpu=true", "run.resource_wait_s=5")
        assert status == JobStatus.FAILED, logs[-3000:]
        assert "waiting up to run.resource_wait_s=5 s for the autoscaler" in logs
        assert "did not come within run.resource_wait_s=5 s: 2 workers x 1 CPU, 1 GPU asked" in logs
        assert took < 90

        status, logs, most, _ = run_job("run.name=scaled", "run.resource_wait_s=240")
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        assert most >= 2, "the autoscaler never added a node"
        assert "step     12/12" in logs
        assert [r["step"] for r in read_metrics(str(tmp_path / "runs" / "scaled"))] == [0, 4, 8, 12]
        # Idle nodes are removed after idle_timeout_minutes (12 s) once the run has released them.
        deadline = time.time() + 120
        while alive_nodes() > 1 and time.time() < deadline:
            time.sleep(1)
        assert alive_nodes() == 1, "the added nodes never went away"
    finally:
        head.stop()
    assert head.leftover_pids() == []
