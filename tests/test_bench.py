"""`raygpt bench`: its arithmetic (fast) and one real sitting of all four rows (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_corpus

from raygpt.bench.train import bench_config, measure, row_command
from raygpt.config import config_from_dict

REPO = Path(__file__).resolve().parent.parent


def test_measure_skips_the_warm_up_window_and_weights_windows_by_time():
    rows = [
        {"step": 0, "wall_time": 105.0, "mfu": None, "step_time": 0.0, "tokens_per_s": 0.0,
         "tokens_per_s_per_device": 0.0},
        {"step": 2, "mfu": 0.01, "step_time": 5.0, "tokens_per_s": 10.0, "tokens_per_s_per_device": 5.0},  # warm-up
        {"step": 4, "mfu": 0.2, "step_time": 1.0, "tokens_per_s": 100.0, "tokens_per_s_per_device": 50.0,
         "cpu_rss_peak_mb": 900.0},
        {"step": 8, "mfu": 0.4, "step_time": 0.5, "tokens_per_s": 200.0, "tokens_per_s_per_device": 100.0,
         "cpu_rss_peak_mb": 800.0},
    ]
    m = measure(rows, launched=100.0)
    # windows after the first: 2 steps x 1 s at 100 tok/s, 4 steps x 0.5 s at 200 tok/s -> 600 / 4
    assert m == {"tokens_per_s": 150.0, "tokens_per_s_per_device": 75.0, "mfu": pytest.approx(0.3), "startup_s": 5.0,
                 "peak_memory_mb": 900.0}
    gpu = [{**r, "gpu_memory_peak_mb": 5000.0} for r in rows]
    assert measure(gpu, launched=100.0)["peak_memory_mb"] == 5000.0


def test_rows_are_the_commands_a_user_types(tmp_path):
    zero, _ = row_command("0", "c.yaml", "/s/00", 2, None)
    assert zero[1:] == ["-m", "raygpt.bench.bare", "c.yaml", "/s/00", "2"]
    a, _ = row_command("a", "c.yaml", "a0", 2, None)
    assert a[1:5] == ["-m", "raygpt", "train", "--config"] and "--no-ray" in a and "run.cpus_per_worker=2" in a
    c, _ = row_command("c", "c.yaml", "c0", 2, "127.0.0.1:1")
    assert "run.num_workers=2" in c and "run.cpus_per_worker=1" in c and c[-2:] == ["--address", "127.0.0.1:1"]
    d, env = row_command("d", "c.yaml", "d0", 2, None)
    assert d[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert "--no-ray" in d and env["OMP_NUM_THREADS"] == "1"
    e, _ = row_command("e", "c.yaml", "e0", 2, None)
    f, _ = row_command("f", "c.yaml", "f0", 2, None)
    assert "run.strategy=fsdp" in e and "run.num_workers=2" in e and "--no-ray" not in e
    assert "run.strategy=fsdp" in f and f[1:3] == ["-m", "torch.distributed.run"] and "--no-ray" in f
    assert "run.strategy=fsdp" not in c + d
    for preset in ("tiny", "small", "gpt2-small"):
        config_from_dict(bench_config(preset, 40, "cpu", "fp32", False, str(tmp_path), str(tmp_path)))


@pytest.mark.slow
def test_bench_runs_all_five_rows_and_prints_the_json(ray_address, tmp_path, run_cli):
    data = make_corpus(tmp_path)
    code, out, err = run_cli("bench", "--preset", "tiny", "--steps", "4", "--repeats", "1", "--data", str(data),
                             "--address", ray_address)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    for row in "0abcd":
        r = result[row]
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["startup_s"] > 0 and r["peak_memory_mb"] > 50, r
    assert result["a/0"] > 0 and result["b/a"] > 0 and result["c/d"] > 0
    assert "b/a:" in out and "torchrun, 2 processes" in out


def test_the_gpu_check_script_runs_on_cpu_with_only_torch_and_the_package():
    # The GPU machines have torch but no Ray or YAML: the script imports neither.
    code = ("import sys, json; sys.modules['ray'] = sys.modules['yaml'] = None; "
            "from raygpt.bench import gpu_check; "
            "r = gpu_check.main(['--device', 'cpu', '--preset', 'tiny', '--steps', '2', "
            "'--warmup', '1', '--batch', '2', '--no-compile']); print('RESULT', json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1 and result["parameters"] > 13_000_000
    assert result["loss_last"] == result["loss_last"]  # finite


def test_the_bare_loop_row_times_windows_of_steps(tmp_path):
    import yaml

    from raygpt.runs import read_metrics

    data = make_corpus(tmp_path)
    cfg = bench_config("tiny", 4, "cpu", "fp32", False, str(data), str(tmp_path))
    cfg["model"] = {"embedding_dim": 32, "num_layers": 2, "num_heads": 2, "context_len": 16, "dropout": 0.0}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cmd, env = row_command("0", str(tmp_path / "c.yaml"), str(tmp_path / "00"), 1, None)
    subprocess.run(cmd, env=env, check=True, timeout=300)
    rows = read_metrics(str(tmp_path / "00"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # eval_freq = steps // 4 = 1
    assert all(r["tokens_per_s"] > 0 and r["cpu_rss_peak_mb"] > 50 for r in rows[1:])
    assert rows[-1]["loss"] < rows[1]["loss"]
    m = measure(rows, launched=rows[0]["wall_time"] - 1.0)
    assert m["tokens_per_s"] > 0 and m["startup_s"] == pytest.approx(1.0)


def test_the_gpu_check_measures_one_worker_of_the_gpt2_small_job():
    from raygpt.bench.gpu_check import build_parser
    from raygpt.config import load_config
    from raygpt.model import PRESETS

    check = build_parser().parse_args([])
    job = load_config(str(Path(__file__).resolve().parent.parent / "jobs" / "gpt2-small.yaml"), [])
    m, t, r = job.model, job.train, job.run
    assert PRESETS[check.preset] == {k: getattr(m, k) for k in PRESETS[check.preset]}
    assert (m.dropout, m.tie_embeddings) == (0.0, False)  # what the check builds
    assert check.pad_vocab == m.pad_vocab_multiple
    assert check.compile == t.compile
    assert check.grad_accum == t.grad_accum_steps
    assert check.batch == t.batch_size // (r.num_workers * t.grad_accum_steps)
    assert check.precision == t.precision


def test_rows_ask_for_no_more_cpus_than_ray_advertises(monkeypatch):
    # In a container whose CPU quota is below os.cpu_count(), Ray advertises the quota.
    from raygpt import cluster
    from raygpt.bench import train

    monkeypatch.setattr(cluster, "local_ray_cpus", lambda: 1)
    assert train.usable_threads() == 1
    monkeypatch.setattr(cluster, "local_ray_cpus", lambda: 10_000)
    assert train.usable_threads() == len(os.sched_getaffinity(0))


def test_the_gpu_check_script_stops_and_says_so_when_a_part_fails(tmp_path):
    script = Path(__file__).resolve().parent.parent / "raygpt" / "bench" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    unknown = subprocess.run(["bash", str(script), "nope", str(tmp_path)], capture_output=True, text=True, env=env)
    assert unknown.returncode == 2 and "use check, eager, rows, ray or all" in unknown.stderr
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check part would run")
    failed = subprocess.run(["bash", str(script), "check", str(tmp_path)], capture_output=True, text=True, env=env,
                            cwd=script.parent.parent.parent)
    assert failed.returncode != 0 and "gpu_check.sh check: failed" in failed.stderr
    assert "no CUDA device here" in (tmp_path / "gpu_check.txt").read_text()


def test_the_checkpoint_bench_times_both_modes_and_stores_whole_checkpoints(tmp_path, capsys):
    from raygpt.bench.checkpoint import bench_checkpoint
    from raygpt.errors import UserError

    out = bench_checkpoint("tiny", repeats=1, s3="none", local_dir=str(tmp_path))
    row = out["local disk"]
    assert row["sync"] > 0 and 0 < row["async_blocked"] and row["async_background"] > 0
    assert "blocked ratio" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())  # its scratch folder is gone
    with pytest.raises(UserError, match="--preset must be one of"):
        bench_checkpoint("huge", repeats=1, s3="none")


def test_a_background_save_stores_the_same_checkpoint_as_a_sync_one(tmp_path):
    from raygpt.bench.checkpoint import model_with_optimizer_state, save_async, save_sync
    from raygpt.checkpoint import load_checkpoint

    model, optimizer = model_with_optimizer_state("tiny")
    save_sync(model, optimizer, str(tmp_path / "sync"))
    save_async(model, optimizer, str(tmp_path / "async"))
    a, b = load_checkpoint(tmp_path / "sync"), load_checkpoint(tmp_path / "async")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (tmp_path / "sync" / "optimizer.pt").stat().st_size == (tmp_path / "async" / "optimizer.pt").stat().st_size


def test_the_transfer_summary_finds_each_widths_best_lr_and_the_cost_of_transferring_it(tmp_path):
    from raygpt.bench.mup_transfer import format_table, plot, summarize

    # width 128's best is 2^-8; at width 512 that lr gives 4.04 against its own best 4.00 (2^-9)
    table = {64: {2**-9: 4.3, 2**-8: 4.2, 2**-7: 4.25}, 128: {2**-9: 4.15, 2**-8: 4.1, 2**-7: 4.3},
             512: {2**-9: 4.0, 2**-8: 4.04, 2**-7: 4.5}}
    s = summarize(table, base_width=128)
    assert s["best_lr"] == {"64": 2**-8, "128": 2**-8, "512": 2**-9} and s["spread_grid_steps"] == 1
    assert s["transfer"]["to_width"] == 512 and s["transfer"]["gap_percent"] == pytest.approx(1.0)
    text = format_table("mup", table, s)
    assert "4.1000*" in text and "(+1.00%)" in text and "spread over widths: 1 grid step(s)" in text
    plot({"standard": table, "mup": table}, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_repeated_runs_of_a_grid_point_count_as_their_mean_and_their_number_is_shown():
    from raygpt.bench.mup_transfer import bench_mup_transfer, format_table, mean_losses, summarize
    from raygpt.errors import UserError

    runs = {64: {2**-9: [4.3, 4.1], 2**-8: [4.15]}, 128: {2**-9: [4.0, 4.2, 4.4], 2**-8: [4.1]}}
    table = mean_losses(runs)
    assert table[64][2**-9] == pytest.approx(4.2) and table[128][2**-9] == pytest.approx(4.2)
    s = summarize(table, base_width=64)
    assert s["best_lr"] == {"64": 2**-8, "128": 2**-8}  # 4.1 once beats 4.2 as a mean of three
    text = format_table("mup", table, s, {w: {lr: len(v) for lr, v in lrs.items()} for w, lrs in runs.items()})
    assert "final val loss (mean over runs)" in text and "runs per grid point (seeds)" in text
    assert text.splitlines()[-3].split() == ["128", "3", "1"]
    assert "mean over runs" not in format_table("mup", table, s, {w: {lr: 1 for lr in lrs} for w, lrs in runs.items()})
    with pytest.raises(UserError, match="an experiment is given twice"):
        bench_mup_transfer(["runs/a", "runs/a"])
