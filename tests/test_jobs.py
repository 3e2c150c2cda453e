"""`ray job submit` against a real local head with token auth on (slow tier).

The jobs run exactly as the README tells users to submit them: `--working-dir .` ships the repo,
`python jobs/pretrain.py` / `python jobs/tune.py` join the cluster they were submitted to.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import make_corpus, tiny_overrides

from raygpt.runs import read_metrics

ANSI = re.compile(r"\x1b\[[0-9;]*m")
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def ray_cli(head, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": head.dashboard_url, "NO_COLOR": "1", **(env or {})}
    proc = subprocess.run([BIN / "ray", *map(str, args)], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)
    proc.stdout, proc.stderr = ANSI.sub("", proc.stdout), ANSI.sub("", proc.stderr)
    return proc


def submit(head, *entrypoint, runtime_env=("--working-dir", ".")) -> str:
    proc = ray_cli(head, "job", "submit", "--no-wait", *runtime_env, "--", "python", *entrypoint)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job_id,) = [line.split("'")[1] for line in proc.stdout.splitlines() if "submitted successfully" in line]
    return job_id


def wait(head, job_id, timeout_s=300) -> tuple[str, str]:
    """The job's final status and its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head.dashboard_url)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status.value, client.get_job_logs(job_id)
        time.sleep(1)
    client.stop_job(job_id)
    raise AssertionError(f"job {job_id} still {status} after {timeout_s} s:\n{client.get_job_logs(job_id)[-3000:]}")


def test_pretrain_job_succeeds_and_leaves_its_run_in_the_storage(ray_head, data_dir, tmp_path):
    # As the README submits it: the runtime_env file ships the repository.
    job = submit(ray_head, "jobs/pretrain.py", "--config", "jobs/pretrain.yaml",
                 *[a for o in tiny_overrides(data_dir, tmp_path) + ["run.name=job", "run.num_workers=2"]
                   for a in ("--set", o)], runtime_env=("--runtime-env", "jobs/runtime_env.yaml"))
    status, logs = wait(ray_head, job)
    assert status == "SUCCEEDED", logs[-3000:]
    # Read by people and scripts: no colour codes, no Ray error line on a healthy run, one line
    # per report with the sample on its own line.
    assert not ANSI.search(logs) and "PreemptionWatcher" not in logs, logs[-3000:]
    reports = [line for line in logs.splitlines() if re.search(r"(^|\) )step +\d+/\d+ \|", line)]
    samples = [line for line in logs.splitlines() if "  sample: " in line]
    assert len(reports) == len(samples) == 4
    status = ray_cli(ray_head, "job", "status", job).stdout
    assert f"Job '{job}' succeeded" in status, status
    logs = ray_cli(ray_head, "job", "logs", job).stdout
    assert f"-> {tmp_path}/job" in logs  # where results go
    assert "step      4/12" in logs and "step     12/12" in logs and "plot:" in logs
    run = tmp_path / "job"
    assert [r["step"] for r in read_metrics(str(run))] == [0, 4, 8, 12]
    assert (run / "checkpoint_0000012" / "model.pt").is_file() and (run / "loss.png").is_file()


def test_tune_job_succeeds_with_trials_in_the_storage(ray_head, data_dir, tmp_path):
    base = yaml.safe_load((REPO / "jobs" / "tune.yaml").read_text())
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({**base, "search": {"optim.peak_lr": {"grid": [0.01, 0.001]}},
                                      "tune": {**base["tune"], "grace_period": 4, "name": "exp"}}))
    job = submit(ray_head, "jobs/tune.py", "--config", search,
                 *[a for o in tiny_overrides(data_dir, tmp_path) + ["train.max_steps=8", "train.save_freq=4"]
                   for a in ("--set", o)])
    status, logs = wait(ray_head, job)
    assert status == "SUCCEEDED", logs[-3000:]
    logs = ray_cli(ray_head, "job", "logs", job).stdout
    assert "experiment exp: 2 trials" in logs and "best" in logs.lower()
    experiment = tmp_path / "exp"
    runs = sorted(experiment.glob("train-*"))
    assert len(runs) == 2 and all(sorted(r.glob("checkpoint_*")) for r in runs)
    assert (experiment / "trials.csv").is_file() and (experiment / "best_config.yaml").is_file()


def test_a_failing_job_ends_failed(ray_head, data_dir, tmp_path):
    job = submit(ray_head, "jobs/pretrain.py", "--config", "jobs/pretrain.yaml",
                 *[a for o in tiny_overrides(data_dir, tmp_path) + ["run.name=bad", "fault.crash_at_step=2"]
                   for a in ("--set", o)])
    status, logs = wait(ray_head, job)
    assert status == "FAILED", logs[-3000:]
    logs = ray_cli(ray_head, "job", "logs", job).stdout
    assert "raygpt: training failed: " in logs and "InjectedFault" in logs
    status = ray_cli(ray_head, "job", "status", job).stdout
    assert f"Job '{job}' failed" in status and "exit code 1" in status, status


def test_bad_config_job_fails_with_one_line(ray_head, tmp_path):
    job = submit(ray_head, "jobs/pretrain.py", "--config", "jobs/pretrain.yaml", "--set", "train.batch_size=0")
    status, logs = wait(ray_head, job)
    assert status == "FAILED", logs[-3000:]
    logs = ray_cli(ray_head, "job", "logs", job).stdout
    assert "raygpt: error: train.batch_size must be > 0, got 0" in logs and "Traceback" not in logs


@pytest.mark.parametrize("env, answer", [
    ({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": ""}, "Unauthorized: Missing authentication token"),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}, "Forbidden: Invalid authentication token"),
])
def test_a_submission_without_the_token_is_refused(ray_head, tmp_path, env, answer):
    from ray.job_submission import JobSubmissionClient

    before = {j.submission_id for j in JobSubmissionClient(ray_head.dashboard_url).list_jobs()}
    # HOME elsewhere: the client must not find ~/.ray/auth_token either.
    proc = ray_cli(ray_head, "job", "submit", "--no-wait", "--", "python", "-c", "print(1)",
                   env={**env, "HOME": str(tmp_path)}, timeout=120)
    assert proc.returncode != 0
    assert answer in proc.stderr, proc.stderr[-1500:]
    assert {j.submission_id for j in JobSubmissionClient(ray_head.dashboard_url).list_jobs()} == before


def test_the_jobs_api_answers_only_with_the_token(ray_head):
    import urllib.error
    import urllib.request

    token = subprocess.run([BIN / "ray", "get-auth-token"], capture_output=True, text=True, check=True).stdout.strip()

    def get(headers):
        try:
            return urllib.request.urlopen(urllib.request.Request(f"{ray_head.dashboard_url}/api/jobs/",
                                                                 headers=headers), timeout=30).status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert get({}) == 401
    assert get({"Authorization": "Bearer not-the-token"}) == 403
    assert get({"Authorization": f"Bearer {token}"}) == 200


def test_the_gpt2_xl_job_passes_its_launch_check_offline(run_cli, tmp_path):
    # Its bucket is out of reach here: the same config on a local corpus of enough windows for one
    # step (128 x 1024 tokens) and a local storage path; no Ray is started by --check.
    from helpers import prose_documents

    from raygpt.data.prepare import prepare_local

    src = tmp_path / "src"
    src.mkdir()
    for copy in range(2):  # the pydoc topics twice: ~250k train tokens
        for i, text in enumerate(prose_documents()):
            (src / f"doc{copy}-{i:03d}.txt").write_text(text)
    data = tmp_path / "data"
    prepare_local([str(src)], data, val_fraction=0.2, log=lambda *a: None, progress=False)
    code, out, err = run_cli("train", "--check", "--config", str(REPO / "jobs" / "gpt2-xl.yaml"),
                             "--set", f"data.dir={data}", "--set", "data.source=null",
                             "--set", f"run.storage_path={tmp_path / 'runs'}")
    assert code == 0, err
    plan, ok = out.splitlines()
    assert plan.startswith("memory per worker: 15.93 GB of the A10G's 24 GB, sharded over 8 workers (fsdp) (")
    assert ok.startswith("ok: run ") and ok.endswith(": 1000 steps of 128 x 1024 tokens (131,072,000 tokens) "
                                                      "on 8 worker(s); nothing started")


FINEWEB_SCHEMA = ("text", "id", "dump", "url", "date", "file_path", "language", "language_score", "token_count")


def test_the_gpt2_124m_fineweb_job_is_llm_cs_recipe_and_passes_its_check_offline(run_cli, tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import prose_documents

    from raygpt.config import load_config

    cfg = load_config(REPO / "jobs" / "gpt2-124m-fineweb.yaml")
    m, t, o = cfg.model, cfg.train, cfg.optim
    assert (m.embedding_dim, m.num_layers, m.num_heads, m.context_len, m.tie_embeddings, m.qkv_bias) == (
        768, 12, 12, 1024, True, True)
    assert t.batch_size * m.context_len == 524288 and t.max_tokens == 10**10
    assert (o.peak_lr, o.warmup_steps, o.initial_lr, o.min_lr, o.weight_decay, o.betas) == (
        6e-4, 700, 0.0, 0.0, 0.1, [0.9, 0.95])
    assert [(e["task"], e["every"]) for e in t.evals] == [("hellaswag", 250)] and t.eval_freq == 250
    # FineWeb's published parquet schema, prose inside (~1.5 M train tokens: 2 steps of 512 x 1024)
    docs = prose_documents() * 12
    n = len(docs)
    table = pa.table({"text": docs, "id": [f"<urn:uuid:{i:08x}>" for i in range(n)], "dump": ["CC-MAIN-2024-10"] * n,
                      "url": [f"https://example.org/{i}" for i in range(n)], "date": ["2024-02-21T08:00:00Z"] * n,
                      "file_path": ["s3://commoncrawl/crawl-data/x.warc.gz"] * n, "language": ["en"] * n,
                      "language_score": [0.93] * n, "token_count": [len(d) // 4 for d in docs]})
    assert table.column_names == list(FINEWEB_SCHEMA)
    (tmp_path / "sample" / "10BT").mkdir(parents=True)
    pq.write_table(table, tmp_path / "sample" / "10BT" / "000_00000.parquet")
    code, out, err = run_cli("prepare", str(tmp_path / "sample" / "10BT"), "--out", str(tmp_path / "data"))
    assert code == 0, err
    hellaswag = tmp_path / "hellaswag_val.jsonl"
    hellaswag.write_text("".join(json.dumps(
        {"ind": i, "activity_label": "Baking cookies", "ctx_a": "A woman puts flour in a bowl.", "ctx_b": "she",
         "endings": ["stirs it with a spoon.", "throws it away.", "paints the wall.", "drives a car."],
         "label": i % 4, "split": "val"}) + "\n" for i in range(3)))
    # The sample is tiny: many epochs of it, so the plan runs to the job's 10 B tokens.
    code, out, err = run_cli("train", "--check", "--config", str(REPO / "jobs" / "gpt2-124m-fineweb.yaml"),
                             "--set", f"data.dir={tmp_path / 'data'}", "--set", f"run.storage_path={tmp_path / 'runs'}",
                             "--set", f"train.evals=[{{task: hellaswag, data: {hellaswag}, every: 250}}]",
                             "--set", "train.num_epochs=100000")
    assert code == 0, err
    memory, evals, ok = out.splitlines()
    assert memory.startswith("memory per worker: 15.42 GB of the A10G's 24 GB (")
    assert evals.startswith("eval hellaswag (hellaswag, every 250 steps): 3 items, 12 choices, ")
    assert evals.endswith("78 scorings: 0.00% of the training's compute")
    assert ok.endswith(": 19074 steps of 512 x 1024 tokens (10,000,269,312 tokens) on 8 worker(s); nothing started")
