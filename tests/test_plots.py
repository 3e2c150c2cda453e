"""loss.png: the evals' curves, every logged step's train loss and the gradient norm."""

import struct

import pytest

from raygpt.training.plots import plot_run, smoothed


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    return struct.unpack(">II", head[16:24])


def test_steps_add_a_gradient_norm_panel(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"tokens_seen": 128 * s, "train_loss": 10 - s / 4, "val_loss": 10.2 - s / 4, "epoch": 0} for s in (0, 4, 8)]
    steps = [{"step": s, "tokens_seen": 128 * s, "train_loss": 10 - s / 4, "grad_norm": 1 / s} for s in range(1, 9)]
    assert png_size(plot_run(rows, [0.001] * 8, str(tmp_path / "a.png"))) == (1100, 400)
    assert png_size(plot_run(rows, [0.001] * 8, str(tmp_path / "b.png"), steps)) == (1650, 400)


def test_smoothing_starts_at_the_first_value_and_follows_a_constant():
    assert smoothed([4.0, 4.0, 4.0], 10) == pytest.approx([4.0, 4.0, 4.0])
    assert smoothed([1.0, 3.0], 3)[0] == 1.0 and 1.0 < smoothed([1.0, 3.0], 3)[1] < 3.0
