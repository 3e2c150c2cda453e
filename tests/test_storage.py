"""Storage: one-line errors, writes complete or invisible, abandoned temporaries removed (fast, no Ray)."""

import os
import subprocess
import sys

import pytest
from helpers import checkpoint_folder, kill_upload

from raygpt import runs, storage
from raygpt.errors import UserError


def test_an_unknown_storage_scheme_is_one_line_naming_it(tmp_path, capsys):
    from raygpt.cli import main

    assert main(["generate", "--checkpoint", "foo://bar", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raygpt: error:") and "foo://bar" in err and "\n" not in err, err


def test_a_killed_upload_never_leaves_state_json_beside_partial_weights(tmp_path):
    """state.json marks a checkpoint complete. An upload killed part way (SIGKILL at several
    moments of copying a 100 MB model.pt) leaves either no checkpoint or a whole one."""
    size = 100 * 2**20
    src = checkpoint_folder(tmp_path / "src", size)
    for i, delay in enumerate([0.0, 0.01, 0.03, 0.1]):
        run = tmp_path / f"run{i}"
        kill_upload(src, str(run / "checkpoint_0000001"), delay)
        done = run / "checkpoint_0000001"
        if (done / "state.json").exists():
            assert (done / "model.pt").stat().st_size == size, (
                f"killed at +{delay} s: state.json beside partial weights")
        for uri in runs.list_checkpoints(str(run)) if run.exists() else []:
            assert (tmp_path / uri / "state.json").exists()


def test_small_files_are_written_under_a_temporary_name_of_their_writer(tmp_path):
    target = tmp_path / "run" / "metrics.jsonl"
    storage.write_text(str(target), "a\n")
    storage.write_text(str(target), "b\n")  # a fixed "<name>.tmp" was shared by every writer
    assert target.read_text() == "b\n" and os.listdir(target.parent) == ["metrics.jsonl"]


def test_temporaries_of_a_dead_writer_are_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = storage.temp_prefix("x").split(".tmp-")[1].rsplit("-", 2)[0]
        abandoned = tmp_path / f".checkpoint_0000004.tmp-{host}-{dead_pid}-abc"
        live = tmp_path / f".checkpoint_0000004.tmp-{host}-{alive.pid}-def"
        other = tmp_path / ".checkpoint_0000008.tmp-otherhost-1-ghi"  # another host's: not ours to judge
        for folder in (abandoned, live, other):
            folder.mkdir()
            (folder / "model.pt").write_bytes(b"x")
        assert storage.remove_abandoned(tmp_path, "checkpoint_0000004") == [str(abandoned)]
        assert not abandoned.exists() and live.exists() and other.exists()
    finally:
        alive.kill()
        alive.wait()


def test_an_output_folder_is_new_empty_or_the_writers_own(tmp_path):
    from raygpt.storage import check_output_folder

    own = ("a.txt", ".mark")
    assert check_output_folder(tmp_path / "new", own, ".mark", "w") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", own, ".mark", "w")
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "a.txt").write_text("same name, not ours")
    with pytest.raises(UserError, match=r"holds files w did not write \(a\.txt\)"):
        check_output_folder(tmp_path / "users", own, ".mark", "w")
    (tmp_path / "users" / ".mark").write_text("{}")
    check_output_folder(tmp_path / "users", own, ".mark", "w")  # now an earlier output of w's
    (tmp_path / "users" / "b.txt").write_text("beside it")
    with pytest.raises(UserError, match=r"\(b\.txt\)"):
        check_output_folder(tmp_path / "users", own, ".mark", "w")
    with pytest.raises(UserError, match="--out is empty"):
        check_output_folder("  ", own, ".mark", "w")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "users" / "b.txt", own, ".mark", "w")
