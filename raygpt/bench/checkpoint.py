"""`raygpt bench checkpoint`: how long the training loop is blocked per checkpoint save,
synchronous (write the files, store them) against `run.async_save` (copy the state to host
memory; writing and storing go on in the background), for one worker's whole checkpoint of a
preset (gpt2-small: 163 M parameters, ~2 GB of model.pt + optimizer.pt), on local disk and on an
S3 API (moto's server on loopback when no --s3 URI is given; `pip install 'moto[server]'`).

Both modes run the same code as training (`raygpt.checkpoint`, `raygpt.storage`,
`raygpt.training.saver`), interleaved over --repeats rounds; prints a table and one JSON line.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from raygpt import checkpoint as ckpt
from raygpt import storage
from raygpt.errors import UserError
from raygpt.model import PRESETS, GPTModel
from raygpt.training.saver import BackgroundSave

STATE = {"step": 1, "config": {"model": {}}}  # state.json's content does not change the timing
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def start_moto_server(log_path: str | Path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free loopback port: (its process, its endpoint URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"moto's S3 server did not start: {Path(log_path).read_text()[-2000:]}") from None
            time.sleep(0.2)


def model_with_optimizer_state(preset: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The preset's model and an AdamW that has stepped once (both moments allocated)."""
    if preset not in PRESETS:
        raise UserError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    model = GPTModel(**PRESETS[preset], dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def save_sync(model: torch.nn.Module, optimizer: torch.optim.Optimizer, target: str) -> float:
    """Seconds the loop is blocked by a synchronous save: write the files, store them."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raygpt-ckpt-") as folder:
        ckpt.save_checkpoint(folder, model, optimizer, STATE)
        storage.upload(folder, target)
    return time.perf_counter() - t0


def save_async(model: torch.nn.Module, optimizer: torch.optim.Optimizer, target: str) -> tuple[float, float]:
    """(seconds the loop is blocked, seconds the background took) for a `run.async_save` save."""
    saver = BackgroundSave()
    t0 = time.perf_counter()
    copied = ckpt.snapshot(model, optimizer)

    def work() -> None:
        with tempfile.TemporaryDirectory(prefix="raygpt-ckpt-") as folder:
            ckpt.save_snapshot(folder, copied, STATE)
            storage.upload(folder, target)

    saver.start(target, work)
    blocked = time.perf_counter() - t0
    saver.wait()
    return blocked, saver.last_seconds


def _size(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    with tempfile.TemporaryDirectory() as folder:
        ckpt.save_checkpoint(folder, model, optimizer, STATE)
        return sum(f.stat().st_size for f in Path(folder).iterdir()) / 1e9


def bench_checkpoint(preset: str = "gpt2-small", repeats: int = 3, s3: str | None = "moto",
                     local_dir: str | None = None) -> dict[str, Any]:
    model, optimizer = model_with_optimizer_state(preset)
    size = _size(model, optimizer)
    with tempfile.TemporaryDirectory(prefix="raygpt-bench-ckpt-", dir=local_dir) as scratch:
        targets = {"local disk": os.path.join(scratch, "runs")}
        moto = None
        if s3 == "moto":
            try:
                import boto3
                import moto.server  # noqa: F401
            except ImportError:
                raise UserError("--s3 moto needs moto's server: pip install 'moto[server]' (or --s3 none)") from None
            os.environ.update(TEST_CREDENTIALS)
            moto, endpoint = start_moto_server(os.path.join(scratch, "moto.log"))
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            bucket = f"raygpt-bench-{uuid.uuid4().hex[:8]}"
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            targets["S3 API (moto, loopback)"] = f"s3://{bucket}/runs"
        elif s3 not in (None, "none"):
            targets["S3 API"] = s3.rstrip("/") + f"/raygpt-bench-{uuid.uuid4().hex[:8]}"
        try:
            results = _measure(model, optimizer, targets, repeats)
        finally:
            if moto is not None:
                moto.terminate()
                moto.wait(timeout=30)
    return _print(results, preset, size, repeats)


def _measure(model: torch.nn.Module, optimizer: torch.optim.Optimizer, targets: dict[str, str],
             repeats: int) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    for where, base in targets.items():
        r = results.setdefault(where, {"sync": [], "async_blocked": [], "async_background": []})
        for i in range(repeats):  # interleaved: both modes see the machine in the same state
            r["sync"].append(save_sync(model, optimizer, storage.join(base, f"sync_{i}")))
            blocked, background = save_async(model, optimizer, storage.join(base, f"async_{i}"))
            r["async_blocked"].append(blocked)
            r["async_background"].append(background)
            print(f"  {where} round {i + 1}/{repeats}: sync {r['sync'][-1]:.2f} s, async blocked {blocked:.2f} s "
                  f"(background {background:.2f} s)", flush=True)
    return results


def _print(results: dict[str, dict[str, list[float]]], preset: str, size: float, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {"benchmark": "checkpoint", "preset": preset, "checkpoint_gb": round(size, 2),
                           "repeats": repeats}
    print(f"checkpoint benchmark: {preset}, {size:.2f} GB per save (model.pt + optimizer.pt), median of {repeats}")
    print(f"  {'':<26}{'sync blocked':>14}{'async blocked':>15}{'background':>12}{'blocked ratio':>15}")
    for where, r in results.items():
        row = {k: statistics.median(v) for k, v in r.items()}
        row["blocked_ratio"] = row["async_blocked"] / row["sync"]
        out[where] = row
        print(f"  {where:<26}{row['sync']:>13.2f}s{row['async_blocked']:>14.2f}s{row['async_background']:>11.2f}s"
              f"{row['blocked_ratio']:>15.3f}")
    print(json.dumps(out))
    return out
