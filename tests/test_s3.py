"""Every storage path against a real S3 API (moto's server on loopback, reached through
AWS_ENDPOINT_URL as MinIO, Ceph or R2 would be), not only file:// URIs, which rename atomically and
never upload in parts. The `bucket` fixture (conftest.py) gives each test an empty bucket."""


import pyarrow.fs as pafs
import pytest
import torch
import yaml
from helpers import checkpoint_folder, kill_upload, make_prose_corpus, prose_documents, search_raw, tiny_config

from raygpt import runs, storage
from raygpt.data.remote import local_shards, prepare_to
from raygpt.data.windows import WindowDataset
from raygpt.errors import UserError
from raygpt.listing import list_runs
from raygpt.runs import read_metrics
from raygpt.training import recovery
from raygpt.training.local import run_without_ray


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYGPT_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def prose(tmp_path):
    """The second corpus (English prose, not the code the tiny runs are usually built on) as text files."""
    src = tmp_path / "prose"
    src.mkdir()
    for i, text in enumerate(prose_documents()):
        (src / f"doc{i:03d}.txt").write_text(text)
    return src


def listing(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def size(uri: str) -> int:
    fs, path = storage.filesystem(uri)
    return fs.get_file_info(path).size


def test_small_files_round_trip_and_missing_ones_do_not_exist(bucket):
    uri = storage.join(bucket, "a", "b.txt")
    assert not storage.exists(uri)
    storage.write_text(uri, "hello")
    assert storage.exists(uri) and storage.read_text(uri) == "hello"
    storage.write_bytes(storage.join(bucket, "a", "c.bin"), b"\0\1")
    assert listing(storage.join(bucket, "a")) == ["b.txt", "c.bin"]


def test_a_killed_upload_never_leaves_state_json_beside_partial_weights(bucket, tmp_path):
    weights = 40 * 2**20  # past pyarrow's multipart threshold: uploaded in parts
    src = checkpoint_folder(tmp_path / "src", weights)
    for i, delay in enumerate([0.05, 0.3, 1.0]):
        run = storage.join(bucket, f"run{i}")
        kill_upload(src, storage.join(run, "checkpoint_0000001"), delay)
        for uri in runs.complete_checkpoints(run):
            assert size(storage.join(uri, "model.pt")) == weights, (
                f"killed at +{delay} s: state.json beside partial weights")


def test_prepare_into_the_bucket_then_each_node_copies_and_checks_the_shards(bucket, prose, cache):
    uri = storage.join(bucket, "data", "prose")
    manifest = prepare_to(uri, inputs=[str(prose)], val_fraction=0.2, context_len=16, shard_tokens=20_000,
                          progress=False, log=lambda *a: None)
    names = [s["file"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]
    assert len(names) > 2 and listing(uri) == sorted(names + ["manifest.json"])
    local = local_shards(uri, log=lambda *a: None)
    assert local.startswith(str(cache)) and len(WindowDataset(local, "train", 16)) > 1000
    # A shard damaged in the bucket is refused by the next node that copies it, naming it.
    fs, path = storage.filesystem(storage.join(uri, names[0]))
    with fs.open_input_stream(path) as f:
        data = f.read()
    storage.write_bytes(storage.join(uri, names[0]), data[:-8] + b"\0" * 8)
    import shutil

    shutil.rmtree(cache)
    with pytest.raises(UserError, match=rf"{names[0]} differs from the manifest's sha256"):
        local_shards(uri)


def test_a_run_in_the_bucket_resumes_exactly_and_is_listed_sampled_and_exported(bucket, tmp_path, cache, run_cli):
    data = make_prose_corpus(tmp_path / "corpus")  # local: what is compared is the run folder
    torch.set_num_threads(1)
    reference = tmp_path / "reference"
    run_without_ray(tiny_config(data, tmp_path, "model.dropout=0.1"), str(data), str(reference))

    run = storage.join(bucket, "runs", "r1")
    crashing = tiny_config(data, tmp_path, "model.dropout=0.1", "fault.crash_at_step=6", "fault.kind=raise")
    with pytest.raises(recovery.InjectedFault):
        run_without_ray(crashing, str(data), run)
    assert [c.rsplit("/", 1)[-1] for c in runs.complete_checkpoints(run)] == ["checkpoint_0000004"]
    run_without_ray(tiny_config(data, tmp_path, "model.dropout=0.1"), str(data), run)  # resumes from step 4

    with storage.temporary_dir() as tmp:
        final = storage.download(storage.join(run, "checkpoint_0000012"), tmp)
        ours = torch.load(f"{final}/model.pt", weights_only=True)
    theirs = torch.load(reference / "checkpoint_0000012" / "model.pt", weights_only=True)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "resumed in the bucket, not bitwise the same"
    curve = lambda d: [(r["step"], r["train_loss"], r["val_loss"]) for r in read_metrics(d)]  # noqa: E731
    assert curve(run) == curve(str(reference))

    entry = next(e for e in list_runs(storage.join(bucket, "runs")) if e["name"] == "r1")
    assert entry["status"] == "finished" and entry["steps"] == 12
    code, out, err = run_cli("runs", storage.join(bucket, "runs"))
    assert code == 0 and "r1" in out, err
    code, out, err = run_cli("generate", "--checkpoint", run, "--prompt", "The", "--max-new-tokens", "4")
    assert code == 0 and out.startswith("The"), err
    pytest.importorskip("safetensors")
    code, out, err = run_cli("export", "--checkpoint", run, "--out", str(tmp_path / "hf"))
    assert code == 0 and (tmp_path / "hf" / "model.safetensors").is_file(), err


def test_a_lease_on_the_bucket_refuses_a_second_writer(bucket):
    run = storage.join(bucket, "runs", "leased")
    with runs.Lease(run, heartbeat_s=0.2):
        with pytest.raises(UserError, match=r"is being written by .* \(heartbeat"):
            runs.Lease(run).acquire()
    assert listing(run) == []  # released: lease.json deleted


@pytest.mark.slow
def test_a_search_on_the_bucket_writes_its_analysis_there(ray_address, bucket, prose, tmp_path, cache, run_cli):
    """`raygpt tune` with every path in the bucket exits 0 with the trials table and best config in
    the experiment folder there; `raygpt analyze URI` writes them there again, `--out` a copy."""
    data = storage.join(bucket, "data")
    prepare_to(data, inputs=[str(prose)], val_fraction=0.2, context_len=16, progress=False, log=lambda *a: None)
    raw = search_raw(data, storage.join(bucket, "runs"), {"optim.peak_lr": {"grid": [0.002, 0.03]}}, name="exp",
                     max_concurrent_trials=1)
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(raw))
    code, out, err = run_cli("tune", "--config", str(tmp_path / "search.yaml"), "--address", ray_address)
    assert code == 0, err
    experiment = storage.join(bucket, "runs", "exp")
    outputs = {"trials.csv", "trials.parquet", "best_config.yaml", "val_loss_curves.png"}
    assert outputs <= set(listing(experiment)), listing(experiment)
    table = storage.read_text(storage.join(experiment, "trials.csv"))
    assert table.count("TERMINATED") == 2

    fs, path = storage.filesystem(experiment)
    for name in outputs:
        fs.delete_file(f"{path}/{name}")
    code, out, err = run_cli("analyze", experiment, "--out", str(tmp_path / "copy"))
    assert code == 0, err
    assert outputs <= set(listing(experiment)) and outputs <= {p.name for p in (tmp_path / "copy").iterdir()}
    assert (tmp_path / "copy" / "trials.csv").read_text() == table
