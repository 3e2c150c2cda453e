"""Token shards on shared storage: prepare to a URI, one verified copy per node."""

import json
import os

import pytest
from helpers import CORPUS, tiny_config

from raygpt.data.remote import local_shards, prepare_to
from raygpt.data.shards import load_manifest
from raygpt.data.windows import WindowDataset
from raygpt.errors import UserError
from raygpt.runs import read_metrics
from raygpt.training.local import run_without_ray


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(60):
        (src / f"doc{i:02d}.txt").write_text(f"# file {i}\n" + CORPUS.replace("10", str(i + 3)))
    return src


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYGPT_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def prepare_uri(corpus, uri, **kw):
    lines = []
    manifest = prepare_to(uri, inputs=[str(corpus)], val_fraction=0.2, context_len=16, progress=False,
                          log=lines.append, **kw)
    return manifest, lines


def test_prepare_to_a_uri_uploads_shards_then_manifest_and_is_a_no_op_again(corpus, tmp_path):
    uri = f"file://{tmp_path}/bucket/data"
    manifest, lines = prepare_uri(corpus, uri, shard_tokens=3000)
    stored = tmp_path / "bucket" / "data"
    names = sorted(p.name for p in stored.iterdir())
    assert names == ["manifest.json", "train-00000.arrow", "train-00001.arrow", "val-00000.arrow"]
    assert json.loads((stored / "manifest.json").read_text()) == manifest == load_manifest(uri)
    assert "uploaded 3 shards" in lines[-1] and str(tmp_path / "cache") not in "".join(lines)
    mtimes = {p.name: p.stat().st_mtime_ns for p in stored.iterdir()}
    _, again = prepare_uri(corpus, uri, shard_tokens=3000)
    assert "up to date" in again[-1] and {p.name: p.stat().st_mtime_ns for p in stored.iterdir()} == mtimes
    # Changed options rebuild, and shards the new manifest does not name are removed.
    prepare_uri(corpus, uri, shard_tokens=1 << 20)
    assert sorted(p.name for p in stored.iterdir()) == ["manifest.json", "train-00000.arrow", "val-00000.arrow"]


def test_prepare_to_a_uri_refuses_a_folder_it_did_not_write(corpus, tmp_path):
    (tmp_path / "bucket").mkdir()
    (tmp_path / "bucket" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files raygpt did not write \(notes.txt\)"):
        prepare_uri(corpus, f"file://{tmp_path}/bucket")


def test_a_node_copies_the_shards_once_and_verifies_them(corpus, tmp_path, cache):
    uri = f"file://{tmp_path}/bucket/data"
    prepare_uri(corpus, uri, shard_tokens=3000)
    logs = []
    local = local_shards(uri, log=logs.append)
    assert local.startswith(str(cache)) and len(logs) == 1 and "copied 3 shards" in logs[0]
    ours, theirs = WindowDataset(local, "train", 16), WindowDataset(tmp_path / "bucket" / "data", "train", 16)
    assert len(ours) == len(theirs) and all((ours[i][0] == theirs[i][0]).all() for i in range(len(ours)))
    assert local_shards(uri, log=logs.append) == local and len(logs) == 1  # reused, not copied again
    # A damaged copy on this node is noticed and fetched again.
    shard = next(p for p in (cache.iterdir()) if p.is_dir()) / "train-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:100])
    assert local_shards(uri, log=logs.append) == local and len(logs) == 2
    # A damaged shard on the storage is refused, naming it.
    stored = tmp_path / "bucket" / "data" / "val-00000.arrow"
    stored.write_bytes(stored.read_bytes()[:-8] + b"\0" * 8)
    os.utime(tmp_path / "bucket" / "data" / "manifest.json")
    import shutil

    shutil.rmtree(cache)
    with pytest.raises(UserError,
                       match=r"do not match their manifest: val-00000.arrow differs from the manifest's sha256"):
        local_shards(uri)
    assert not any(p.is_dir() for p in cache.iterdir())  # no half copy left to be mistaken for one


def test_a_local_folder_is_used_where_it_is(tmp_path):
    assert local_shards(str(tmp_path)) == str(tmp_path)


def test_training_reads_shards_from_a_uri(corpus, tmp_path, cache):
    uri = f"file://{tmp_path}/bucket/data"
    prepare_uri(corpus, uri)
    cfg = tiny_config(uri, tmp_path / "runs", "train.max_steps=4")
    run_without_ray(cfg, uri, str(tmp_path / "run"))
    assert [r["step"] for r in read_metrics(str(tmp_path / "run"))] == [0, 4]
    assert any(p.is_dir() for p in cache.iterdir())
