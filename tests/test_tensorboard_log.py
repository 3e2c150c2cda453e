"""TensorBoard events of a run, read back with TensorBoard's own reader."""

import pytest
from helpers import make_corpus, tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raygpt.runs import read_metrics
from raygpt.training.local import run_without_ray


def scalars(folder):
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("as_uri", [False, True])
def test_the_events_hold_the_metrics_log(tmp_path, as_uri):
    data = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    run_without_ray(tiny_config(data, tmp_path), str(data), run_dir.as_uri() if as_uri else str(run_dir))
    rows = read_metrics(str(run_dir))
    got = scalars(run_dir)
    assert {"loss/train", "loss/val", "optim/lr", "throughput/tokens_per_s", "throughput/mfu",
            "memory/cpu_rss_peak_mb", "loss_vs_tokens/val"} <= set(got)
    for key, tag in (("val_loss", "loss/val"), ("train_loss", "loss/train"), ("lr", "optim/lr"),
                     ("cpu_rss_peak_mb", "memory/cpu_rss_peak_mb")):
        assert [s for s, _ in got[tag]] == [r["step"] for r in rows]
        assert [v for _, v in got[tag]] == pytest.approx([r[key] for r in rows], rel=1e-6)
    assert [s for s, _ in got["loss_vs_tokens/val"]] == [r["tokens_seen"] for r in rows]
    assert not list(tmp_path.glob("raygpt-tb-*"))


def test_a_resumed_run_purges_the_recomputed_steps(tmp_path):
    from raygpt.training.recovery import InjectedFault

    data = make_corpus(tmp_path)
    run_dir = str(tmp_path / "run")
    # Reports at 0, 2, 4, 6; checkpoints at 4; a crash after step 6: the resume restarts from 4
    # and reports 6 again, which the first events file also holds.
    cfg = tiny_config(data, tmp_path, "train.eval_freq=2", "train.save_freq=4", "fault.crash_at_step=6")
    with pytest.raises(InjectedFault):
        run_without_ray(cfg, str(data), run_dir)
    run_without_ray(cfg, str(data), run_dir)
    got = scalars(run_dir)
    assert [s for s, _ in got["loss/val"]] == [0, 2, 4, 6, 8, 10, 12]
    assert [s for s, _ in got["loss_vs_tokens/val"]] == [r["tokens_seen"] for r in read_metrics(run_dir)]
    values = dict(scalars(run_dir)["loss/val"])
    assert values[6] == pytest.approx(next(r["val_loss"] for r in read_metrics(run_dir) if r["step"] == 6), rel=1e-6)


def test_every_step_has_its_loss_and_grad_norm_in_tensorboard(tmp_path):
    from raygpt.runs import read_steps

    data = make_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    run_without_ray(tiny_config(data, tmp_path), str(data), str(run_dir))
    got = scalars(run_dir)
    steps = read_steps(str(run_dir))
    assert [s for s, _ in got["step/train_loss"]] == list(range(1, 13))
    assert [v for _, v in got["step/grad_norm"]] == pytest.approx([r["grad_norm"] for r in steps], rel=1e-6)
