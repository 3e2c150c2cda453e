"""Checkpoint storage helpers (fast, no Ray)."""

import json

from raygpt import checkpoint as ckpt


def make_checkpoint(run, step, val_loss):
    folder = run / ckpt.checkpoint_name(step)
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"step": step, "val_loss": val_loss}))


def test_prune_keeps_the_best_by_val_loss_and_the_newest(tmp_path):
    for step, loss in [(2, 5.0), (4, 3.0), (6, 4.0), (8, None), (10, 4.5)]:
        make_checkpoint(tmp_path, step, loss)
    (tmp_path / "checkpoint_0000012").mkdir()  # no state.json: scored last, and the newest: kept
    deleted = ckpt.prune_checkpoints(str(tmp_path), keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint_0000004", "checkpoint_0000006", "checkpoint_0000012"]
    assert len(deleted) == 3
    assert ckpt.prune_checkpoints(str(tmp_path), keep=5) == []


def test_checkpoints_are_ordered_by_step_as_a_number(tmp_path):
    for name in ["checkpoint_10000000", "checkpoint_9999999", "checkpoint_0000005-10", "checkpoint_0000005-2",
                 "checkpoint_0000005", "checkpoint_notes", "other"]:
        (tmp_path / name).mkdir()
    names = [uri.rsplit("/", 1)[1] for uri in ckpt.list_checkpoints(str(tmp_path))]
    assert names == ["checkpoint_0000005", "checkpoint_0000005-2", "checkpoint_0000005-10",
                     "checkpoint_9999999", "checkpoint_10000000"]


def test_an_unknown_storage_scheme_is_one_line_naming_it(tmp_path, capsys):
    from raygpt.cli import main

    assert main(["generate", "--checkpoint", "foo://bar", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raygpt: error:") and "foo://bar" in err and "\n" not in err, err


def test_a_killed_upload_never_leaves_state_json_beside_partial_weights(tmp_path):
    """state.json marks a checkpoint complete. An upload killed part way (SIGKILL at several
    moments of copying a 100 MB model.pt) leaves either no checkpoint or a whole one."""
    import subprocess
    import sys
    import time

    src = tmp_path / "src"
    src.mkdir()
    size = 100 * 2**20
    with open(src / "model.pt", "wb") as f:
        f.truncate(size)
    (src / "optimizer.pt").write_bytes(b"o" * 1000)
    (src / "state.json").write_text("{}")
    for i, delay in enumerate([0.0, 0.01, 0.03, 0.1]):
        run = tmp_path / f"run{i}"
        code = (f"from raygpt import checkpoint as c; print('go', flush=True); "
                f"c.upload({str(src)!r}, {str(run / 'checkpoint_0000001')!r})")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "go"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        done = run / "checkpoint_0000001"
        if (done / "state.json").exists():
            assert (done / "model.pt").stat().st_size == size, f"killed at +{delay} s: state.json beside partial weights"
        for uri in ckpt.list_checkpoints(str(run)) if run.exists() else []:
            assert (tmp_path / uri / "state.json").exists()
