"""Reading prepared data: the manifest's checks and memory-mapped shards (raygpt.data.shards)."""


import numpy as np
import pytest

from raygpt.data.prepare import write_shard
from raygpt.data.shards import read_shard
from raygpt.data.windows import WindowDataset
from raygpt.errors import UserError


def test_shards_are_memory_mapped_not_copied(tmp_path):
    write_shard(tmp_path / "s.arrow", np.arange(100, dtype=np.uint16))
    arr = read_shard(tmp_path / "s.arrow")
    assert arr.dtype == np.uint16 and not arr.flags.writeable and not arr.flags.owndata


def test_missing_manifest_says_to_run_prepare(tmp_path):
    with pytest.raises(UserError, match="run `raygpt prepare`"):
        WindowDataset(tmp_path, "train", 8)


@pytest.mark.parametrize("text, message", [
    ("not json", "is not a raygpt manifest \\(not JSON"),
    ("[1, 2]", "expected a mapping with 'splits'"),
    ('{"splits": {"train": {"shards": []}}}', "splits.val.shards must be a list"),
    ('{"splits": {"train": {"shards": [{"file": "../../escape/payload.arrow"}]}, "val": {"shards": []}}}',
     "shard file '../../escape/payload.arrow' in splits.train must be a plain file name"),
    ('{"splits": {"train": {"shards": [{"file": "/etc/passwd"}]}, "val": {"shards": []}}}',
     "must be a plain file name"),
    ('{"splits": {"train": {"shards": []}, "val": {"shards": [{"file": ".."}]}}}', "must be a plain file name"),
])
def test_a_bad_manifest_is_one_line_and_no_shard_path_leaves_the_folder(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(UserError, match=message) as info:
        WindowDataset(tmp_path, "train", 8)
    assert "\n" not in str(info.value)


def _manifest(train, val):
    split = lambda shards: {"tokens": sum(s["tokens"] for s in shards), "shards": shards}  # noqa: E731
    return {"splits": {"train": split(train), "val": split(val)}}


@pytest.mark.parametrize("train, val, message", [
    ([{"file": "a.arrow", "tokens": 10, "bytes": 500}], [{"file": "a.arrow", "tokens": 10, "bytes": 500}],
     "shard a.arrow is listed twice"),
    ([{"file": "a.arrow", "tokens": 10, "bytes": 500}, {"file": "a.arrow", "tokens": 10, "bytes": 500}], [],
     "shard a.arrow is listed twice"),
    ([{"file": "a.arrow", "tokens": 10_000, "bytes": 500}], [], "claims 10,000 tokens in 500 bytes"),
])
def test_a_manifest_that_cannot_be_true_is_refused(tmp_path, train, val, message):
    """The train shard listed as val, a shard listed twice, token counts inflated past the bytes
    (a hand-edited manifest whose sha256 entries still match the files)."""
    import json

    from raygpt.data.shards import load_manifest

    (tmp_path / "manifest.json").write_text(json.dumps(_manifest(train, val)))
    with pytest.raises(UserError, match=message):
        load_manifest(tmp_path)


def test_the_full_check_counts_tokens_even_when_the_hash_matches(tmp_path):
    import json

    from raygpt.data.shards import file_sha256, shard_problem

    write_shard(tmp_path / "a.arrow", np.arange(100, dtype=np.uint16))
    entry = {"file": "a.arrow", "tokens": 90, "bytes": (tmp_path / "a.arrow").stat().st_size,
             "sha256": file_sha256(tmp_path / "a.arrow")}
    manifest = _manifest([entry], [])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert shard_problem(tmp_path, manifest, full=True) == "a.arrow does not hold the manifest's 90 tokens"
    assert shard_problem(tmp_path, manifest, full=False) is None  # sizes only at every start
