"""The loop without Ray (one process): planning, accumulation, reproducibility, resume."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import make_corpus, make_prose_corpus, run_workers, tiny_config, tiny_overrides

from raygpt.config import load_config
from raygpt.data.windows import WindowDataset
from raygpt.generate import load_model
from raygpt.model import GPTModel
from raygpt.runs import read_events, read_metrics
from raygpt.training.local import run_without_ray
from raygpt.training.loop import build_optimizer

# A val split whose head is far easier than the rest: this repetitive document comes first in it
# (and in train, so the model learns it), then the pydoc topics' prose.
EASY_HEAD = " the" * 2000


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def weights(run_dir, step):
    return torch.load(run_dir / f"checkpoint_{step:07d}" / "model.pt", weights_only=True)


def run(cfg, data_dir, run_dir):
    torch.set_num_threads(1)
    return run_without_ray(cfg, str(data_dir), str(run_dir))


# ----------------------------------------------------------------------------- planning


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
    assert all(r["cpu_rss_peak_mb"] > 50 for r in rows)  # peak memory in every report
    # step 0 reads one global batch of windows per split (8 x 16 tokens), the others eval_tokens
    assert [r["eval_tokens"] for r in rows] == [128, 256, 256, 1024]
    assert rows[0]["train_eval_tokens"] == 128 and rows[1]["train_eval_tokens"] == 256
    state = json.loads((tmp_path / "run" / "checkpoint_0000012" / "state.json").read_text())
    assert state["step"] == 12 and state["samples_consumed"] == 96 and state["config"]["model"]["embedding_dim"] == 32


def test_every_step_is_logged_with_its_loss_grad_norm_and_lr(data_dir, tmp_path):
    from raygpt.runs import read_steps
    from raygpt.training.schedule import lr_at

    cfg = tiny_config(data_dir, tmp_path)  # train.log_freq 1 by default
    run(cfg, data_dir, tmp_path / "run")
    steps = read_steps(str(tmp_path / "run"))
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all({"train_loss", "grad_norm", "lr", "step_time", "tokens_per_s", "tokens_seen"} <= set(r) for r in steps)
    assert [r["lr"] for r in steps] == [lr_at(s - 1, 12, cfg.optim) for s in range(1, 13)]
    assert steps[-1]["tokens_seen"] == 12 * 8 * 16 and steps[-1]["train_loss"] < steps[0]["train_loss"]
    assert [r["step"] for r in read_metrics(str(tmp_path / "run"))] == [0, 4, 8, 12]  # the reports, as before
    cfg.train.log_freq = 5
    run(cfg, data_dir, tmp_path / "sparse")
    assert [r["step"] for r in read_steps(str(tmp_path / "sparse"))] == [5, 10]


def test_same_seed_same_weights(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path, "model.dropout=0.1", "train.max_steps=6")
    run(cfg, data_dir, tmp_path / "a")
    run(cfg, data_dir, tmp_path / "b")
    a, b = weights(tmp_path / "a", 6), weights(tmp_path / "b", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_activation_checkpointing_leaves_the_run_as_it_was(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path, "model.dropout=0.1", "train.max_steps=6")
    run(cfg, data_dir, tmp_path / "a")
    cfg.model.activation_checkpointing = True
    run(cfg, data_dir, tmp_path / "b")
    a, b = weights(tmp_path / "a", 6), weights(tmp_path / "b", 6)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    curve = lambda d: [v for r in read_metrics(str(d)) for v in (r["step"], r["train_loss"], r["val_loss"])]  # noqa: E731
    assert curve(tmp_path / "a") == pytest.approx(curve(tmp_path / "b"), abs=1e-6)


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


# ----------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def prose_dir(tmp_path_factory):
    return make_prose_corpus(tmp_path_factory.mktemp("prose"), easy_head=EASY_HEAD)


def whole_split_loss(checkpoint, data_dir, split="val"):
    """Mean cross-entropy over every non-overlapping window of a split, from the checkpoint alone."""
    model, state = load_model(str(checkpoint))
    context_len = state["config"]["model"]["context_len"]
    ds = WindowDataset(data_dir, split, context_len, context_len)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ds), 64):
            xs, ys = zip(*(ds[i] for i in range(start, min(start + 64, len(ds)))))
            logits = model(torch.stack(xs))
            total += F.cross_entropy(logits.flatten(0, 1), torch.stack(ys).flatten(), reduction="sum").double().item()
    return total / (len(ds) * context_len)


def test_final_val_loss_is_the_whole_split_loss_and_first_batches_are_not(prose_dir, tmp_path, capsys):
    # 1,938 val windows of 16 tokens, the first 125 of them the easy head. Reports read 2,048
    # tokens (128 windows) spread over the split; the last report 4,096 (256 windows) of val.
    sizes = ("train.eval_tokens=2048", "train.final_eval_tokens=4096")
    spread = tiny_config(prose_dir, tmp_path, *sizes)
    run(spread, prose_dir, tmp_path / "spread")
    out = capsys.readouterr().out
    rows = read_metrics(str(tmp_path / "spread"))
    assert [r["step"] for r in rows] == [0, 4, 8, 12]
    assert [r["final_eval"] for r in rows] == [False, False, False, True]
    assert [r["eval_tokens"] for r in rows] == [128, 2048, 2048, 4096]  # step 0: one global batch
    assert [r["train_eval_tokens"] for r in rows] == [128] + [2048] * 3  # the larger final sample is val's only
    assert all(r["eval_time"] > 0 for r in rows)
    lines = [line for line in out.splitlines() if line.startswith("step")]
    assert len(lines) == 4 and all(" | eval " in line for line in lines[:3])
    assert " | final eval: 4,096 val tokens, " in lines[-1]

    whole = whole_split_loss(tmp_path / "spread" / "checkpoint_0000012", prose_dir)
    assert abs(rows[-1]["val_loss"] - whole) / whole < 0.01, (rows[-1]["val_loss"], whole)
    # An ordinary report (128 windows) too, against the step-8 checkpoint.
    whole8 = whole_split_loss(tmp_path / "spread" / "checkpoint_0000008", prose_dir)
    assert abs(rows[2]["val_loss"] - whole8) / whole8 < 0.02, (rows[2]["val_loss"], whole8)

    # The original recipe's mode reads the first eval_iter micro-batches: only the easy head.
    first = tiny_config(prose_dir, tmp_path, *sizes, "train.eval_mode=first")
    run(first, prose_dir, tmp_path / "first")
    first_rows = read_metrics(str(tmp_path / "first"))
    assert [r["eval_tokens"] for r in first_rows] == [2 * 8 * 16] * 4 and not first_rows[-1]["final_eval"]
    assert first_rows[-1]["val_loss"] < 0.9 * whole
    # Evaluation never touches training: both runs end with the same weights.
    a, b = weights(tmp_path / "spread", 12), weights(tmp_path / "first", 12)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_spread_eval_is_the_same_on_one_and_two_workers(prose_dir, tmp_path):
    overrides = tiny_overrides(prose_dir, tmp_path) + [
        "train.max_steps=4", "train.eval_freq=2", "train.save_freq=4", "train.eval_tokens=1000",
        "train.final_eval_tokens=3000"]
    run(load_config(None, overrides), prose_dir, tmp_path / "one")
    run_workers(2, overrides, prose_dir, tmp_path / "two")
    one, two = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 2, 4]
    for a, b in zip(one, two):
        # 63 windows (1,008 tokens), 188 at the end, 8 (one global batch) at step 0, split between
        # the ranks and summed in float64.
        expected = 128 if a["step"] == 0 else 3008 if a["final_eval"] else 1008
        assert a["eval_tokens"] == b["eval_tokens"] == expected
        assert a["train_eval_tokens"] == b["train_eval_tokens"] == (128 if a["step"] == 0 else 1008)
        assert a["final_eval"] == b["final_eval"]
        for key in ("val_loss", "train_loss"):
            assert abs(a[key] - b[key]) <= 1e-6 * abs(a[key]), (key, a["step"], a[key], b[key])


# ----------------------------------------------------------------------------- a loss that blows up


def test_a_non_finite_gradient_stops_the_run_before_the_step_and_saves_nothing_bad(data_dir, tmp_path):
    """Step 0 at lr 1e-4 is saved; from step 1 the warmup towards 1e10 overflows the model; the run stops at the first
    non-finite gradient norm or eval loss, naming the step, and no checkpoint holds that state."""
    from raygpt.errors import TrainingFailed

    cfg = tiny_config(data_dir, tmp_path, "optim.peak_lr=1e10", "optim.warmup_steps=10", "train.save_freq=1",
                      "optim.initial_lr=1e-4", "optim.min_lr=1e10")
    with pytest.raises(TrainingFailed, match=r"non-finite (gradient norm|train loss|val loss) \(\w+\) at step \d+"):
        run(cfg, data_dir, tmp_path / "run")
    saved = sorted((tmp_path / "run").glob("checkpoint_*"))
    assert saved, "the steps before the bad one were saved"
    for folder in saved:
        model, _ = load_model(str(folder))
        with torch.no_grad():
            assert torch.isfinite(model(torch.randint(0, 1000, (2, 16)))).all(), folder.name


def test_compile_wraps_ddp_not_the_other_way_round(tmp_path):
    # torch.compile's DDP support (DDPOptimizer: all-reduce overlapping backward) needs compile(DDP(model)).
    import torch.distributed as dist

    from raygpt.checkpoint import unwrapped_state_dict
    from raygpt.training.loop import wrap_for_training
    from raygpt.training.reporter import plain_model
    from raygpt.training.runtime import Runtime

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = GPTModel(embedding_dim=32, num_layers=2, num_heads=2, context_len=16, vocabulary_size=100)
        rt = Runtime(wrap_model=lambda m: torch.nn.parallel.DistributedDataParallel(m))
        wrapped = wrap_for_training(model, rt, compile_model=True)
        assert isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule)
        assert isinstance(wrapped._orig_mod, torch.nn.parallel.DistributedDataParallel)
        assert hasattr(wrapped, "no_sync")  # gradient accumulation still skips the all-reduce
        assert plain_model(wrapped) is model
        assert list(unwrapped_state_dict(wrapped)) == list(model.state_dict())
        assert plain_model(wrap_for_training(model, Runtime(), compile_model=False)) is model
    finally:
        dist.destroy_process_group()
