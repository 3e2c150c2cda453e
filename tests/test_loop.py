"""The loop without Ray (one process): planning, accumulation, reproducibility, resume."""

import json
import shutil

import pytest
import torch

from raygpt.config import TrainConfig
from raygpt.errors import UserError
from raygpt.loop import build_optimizer, plan_steps, read_events, read_metrics, run_without_ray, step_seed
from raygpt.model import GPTModel

from helpers import make_corpus, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def weights(run_dir, step):
    return torch.load(run_dir / f"checkpoint_{step:07d}" / "model.pt", weights_only=True)


def run(cfg, data_dir, run_dir):
    torch.set_num_threads(1)
    return run_without_ray(cfg, str(data_dir), str(run_dir))


# ----------------------------------------------------------------------------- planning


def test_plan_micro_batch_and_steps():
    plan = plan_steps(TrainConfig(batch_size=16, grad_accum_steps=2, num_epochs=3), 100, 2, 128, 5)
    assert (plan.micro_batch, plan.steps_per_epoch, plan.total_steps) == (4, 6, 18)


def test_plan_max_steps_and_max_tokens_define_total():
    assert plan_steps(TrainConfig(batch_size=4, max_steps=50), 10, 1, 8, 5).total_steps == 50
    assert plan_steps(TrainConfig(batch_size=4, max_tokens=1000), 10, 1, 8, 5).total_steps == 32
    assert plan_steps(TrainConfig(batch_size=4, max_steps=20, max_tokens=1000), 10, 1, 8, 5).total_steps == 20


@pytest.mark.parametrize(
    "kw, windows, workers, warmup, message",
    [
        (dict(batch_size=10), 100, 4, 0, "train.batch_size 10 does not divide over run.num_workers 4 x "
                                          "train.grad_accum_steps 1; use a multiple of 4"),
        (dict(batch_size=8, grad_accum_steps=3), 100, 1, 0, "use a multiple of 3"),
        (dict(batch_size=64), 50, 1, 0, r"train.batch_size 64 is larger than the dataset \(50 train windows\)"),
        (dict(batch_size=4, num_epochs=1), 40, 1, 10, "optim.warmup_steps 10 must be < total steps 10"),
    ],
)
def test_plan_refuses(kw, windows, workers, warmup, message):
    with pytest.raises(UserError, match=message):
        plan_steps(TrainConfig(**kw), windows, workers, 8, warmup)


def test_step_seed_differs_by_every_part():
    seeds = {step_seed(1, 0, 0, 0), step_seed(2, 0, 0, 0), step_seed(1, 1, 0, 0), step_seed(1, 0, 1, 0),
             step_seed(1, 0, 0, 1)}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)


def test_decay_matrices_only_spares_biases_norms_and_embeddings():
    from raygpt.config import OptimConfig

    model = GPTModel(embedding_dim=16, num_layers=1, num_heads=2, context_len=8, vocabulary_size=50)
    decay, rest = build_optimizer(model, OptimConfig(decay_matrices_only=True)).param_groups
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731 (`in` on tensors compares values)
    assert id(model.tok_emb.weight) in ids(rest) and id(model.pos_emb.weight) in ids(rest)
    assert id(model.out_head.weight) in ids(decay)
    assert all(p.dim() == 2 for p in decay["params"])
    (everything,) = build_optimizer(model, OptimConfig()).param_groups
    assert len(everything["params"]) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- training


def test_run_lowers_loss_and_writes_checkpoints_and_metrics(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path)
    final = run(cfg, data_dir, tmp_path / "run")
    rows = read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in rows] == [0, 4, 8, 12]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 1.0
    assert final["step"] == 12 and final["tokens_seen"] == 12 * 8 * 16
    assert {"train_loss", "val_loss", "lr", "tokens_per_s", "elapsed", "epoch", "sample"} <= set(rows[-1])
    state = json.loads((tmp_path / "run" / "checkpoint_0000012" / "state.json").read_text())
    assert state["step"] == 12 and state["samples_consumed"] == 96 and state["config"]["model"]["embedding_dim"] == 32


def test_same_seed_same_weights(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path, "model.dropout=0.1", "train.max_steps=6")
    run(cfg, data_dir, tmp_path / "a")
    run(cfg, data_dir, tmp_path / "b")
    a, b = weights(tmp_path / "a", 6), weights(tmp_path / "b", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_the_full_batch(data_dir, tmp_path):
    full = tiny_config(data_dir, tmp_path, "train.max_steps=6")
    accum = tiny_config(data_dir, tmp_path, "train.max_steps=6", "train.grad_accum_steps=4")
    run(full, data_dir, tmp_path / "full")
    run(accum, data_dir, tmp_path / "accum")
    a, b = weights(tmp_path / "full", 6), weights(tmp_path / "accum", 6)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_resume_from_a_checkpoint_ends_where_an_uninterrupted_run_does(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path, "model.dropout=0.1", "train.save_freq=5")
    run(cfg, data_dir, tmp_path / "whole")
    # A run that stopped after its step-5 checkpoint, continued from it in a new process's place.
    part = tmp_path / "part"
    run(cfg, data_dir, part)
    shutil.rmtree(part / "checkpoint_0000010")
    shutil.rmtree(part / "checkpoint_0000012")
    run(cfg, data_dir, part)
    a, b = weights(tmp_path / "whole", 12), weights(part, 12)
    assert all(torch.equal(a[k], b[k]) for k in a)
    whole, resumed = read_metrics(str(tmp_path / "whole")), read_metrics(str(part))
    assert [(r["step"], r["val_loss"]) for r in whole] == [(r["step"], r["val_loss"]) for r in resumed]
    (event,) = read_events(str(part))
    assert event["event"] == "resume" and event["restored_step"] == 5 and event["reached_step"] == 12


def test_epochs_roll_over_and_resume_mid_epoch(data_dir, tmp_path):
    # ~430 train windows / batch 8: 53 steps per epoch; 3 epochs with a checkpoint mid-epoch 2.
    cfg = tiny_config(data_dir, tmp_path, "train.max_steps=120", "train.save_freq=60", "train.eval_freq=60")
    final = run(cfg, data_dir, tmp_path / "whole")
    assert final["epoch"] == 2
    part = tmp_path / "part"
    run(cfg, data_dir, part)
    shutil.rmtree(part / "checkpoint_0000120")
    run(cfg, data_dir, part)
    a, b = weights(tmp_path / "whole", 120), weights(part, 120)
    assert all(torch.equal(a[k], b[k]) for k in a)
