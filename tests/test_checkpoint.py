"""Checkpoint state: what a resume or generate accepts before loading anything (fast, no Ray)."""

import os

import pytest
import torch

from raygpt import checkpoint as ckpt
from raygpt.checkpoint import load_checkpoint
from raygpt.errors import UserError

GOOD = {"format_version": 1, "config": {"model": {"context_len": 8}}}


@pytest.mark.parametrize("state, message", [
    ([], "not a mapping"),
    ({**GOOD, "format_version": "1"}, "format_version '1' is not an integer"),
    ({**GOOD, "format_version": 2}, "has format 2, newer than this raygpt reads"),
    ({"format_version": 1}, "has no model config"),
    ({"format_version": 1, "config": {"model": None}}, "has no model config"),
])
def test_a_state_this_raygpt_cannot_use_is_refused_in_one_line(state, message):
    with pytest.raises(UserError, match=message):
        ckpt.check_state(state, "run/checkpoint_0000004")
    ckpt.check_state(GOOD, "run/checkpoint_0000004")


def _sharded_checkpoint(folder):
    """A sharded (DCP) checkpoint written by one process: what an fsdp run of one worker writes."""
    import torch.distributed.checkpoint as dcp

    from raygpt.checkpoint import write_state
    from raygpt.model import GPTModel

    torch.manual_seed(0)
    model = GPTModel(embedding_dim=16, num_layers=1, num_heads=2, context_len=8, vocabulary_size=50)
    dcp.save({"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []}}, checkpoint_id=str(folder))
    write_state(folder, {"config": {"model": {}}})
    return model


def test_a_sharded_checkpoint_reads_back_whole(tmp_path):
    model = _sharded_checkpoint(tmp_path / "c")
    loaded = load_checkpoint(tmp_path / "c", with_optimizer=False)
    assert loaded["sharded"] and all(torch.equal(v, loaded["model"][k]) for k, v in model.state_dict().items())


def test_a_crafted_shard_index_runs_nothing(tmp_path):
    """DCP unpickles `.metadata` without restriction; raygpt allows only the index's own classes."""
    import pickle

    _sharded_checkpoint(tmp_path / "c")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "c" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match=r"is damaged: its \.metadata holds (posix|os)\.system, which is not part"):
        load_checkpoint(tmp_path / "c")
    assert not marker.exists()
    (tmp_path / "c" / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match=r"is damaged: its shards do not load"):
        load_checkpoint(tmp_path / "c")
