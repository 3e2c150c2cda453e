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
