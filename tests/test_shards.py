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
