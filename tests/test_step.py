"""The one training step shared by the loop and the GPU check (no data set, no Ray)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raygpt.errors import TrainingFailed
from raygpt.model import GPTModel
from raygpt.training.step import step_seed, train_step

REPO = Path(__file__).resolve().parent.parent


def tiny_model(dropout=0.0):
    torch.manual_seed(0)
    return GPTModel(vocabulary_size=64, embedding_dim=16, num_layers=1, num_heads=2, context_len=8, dropout=dropout)


def batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    while True:
        w = torch.randint(0, 64, (n, 9), generator=g)
        yield w[:, :-1], w[:, 1:]


def optimizer_for(model):
    return torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.1)


def test_step_sets_the_lr_and_updates_the_weights():
    model = tiny_model()
    opt = optimizer_for(model)
    before = [p.detach().clone() for p in model.parameters()]
    result = train_step(model, opt, batches(), lr=0.01, seed=5, max_norm=1.0)
    assert opt.param_groups[0]["lr"] == 0.01
    assert torch.isfinite(result.loss) and result.grad_norm > 0
    assert all(p.grad is None for p in model.parameters())  # zeroed, set to None
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_the_seed_alone_decides_dropout():
    runs = []
    for _ in range(2):
        model = tiny_model(dropout=0.5)
        opt = optimizer_for(model)
        torch.manual_seed(999)  # whatever the RNG held before, the step's seed decides
        train_step(model, opt, batches(), lr=0.01, seed=step_seed(1, 0, 3, 0), max_norm=None)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_accumulation_reads_one_micro_batch_per_step_and_averages():
    whole, halves = tiny_model(), tiny_model()
    one = next(batches(8))
    r1 = train_step(whole, optimizer_for(whole), iter([one]), lr=0.01, seed=0, max_norm=None)
    split = iter([(one[0][:4], one[1][:4]), (one[0][4:], one[1][4:])])
    r2 = train_step(halves, optimizer_for(halves), split, lr=0.01, seed=0, max_norm=None, grad_accum_steps=2)
    assert next(split, None) is None
    assert torch.allclose(r1.grad_norm, r2.grad_norm, rtol=1e-5)
    for a, b in zip(whole.parameters(), halves.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_clipping_scales_to_max_norm_and_none_only_measures():
    model = tiny_model()
    clipped = train_step(model, optimizer_for(model), batches(), lr=0.0, seed=0, max_norm=1e-3)
    assert clipped.grad_norm > 1e-3  # the norm before clipping is what is returned


def test_a_non_finite_gradient_raises_before_the_optimizer_runs():
    model = tiny_model()
    opt = optimizer_for(model)
    with torch.no_grad():
        model.out_head.weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TrainingFailed, match=r"non-finite gradient norm \(nan\) at step 7 on rank 0"):
        train_step(model, opt, batches(), lr=0.01, seed=0, max_norm=1.0, step_label="step 7 on rank 0")
    for a, p in zip(before, model.parameters()):
        assert torch.equal(a, p) or (a.isnan() == p.isnan()).all() and torch.equal(a.nan_to_num(), p.nan_to_num())
    assert not opt.state  # AdamW never stepped


def test_the_gpu_check_runs_the_training_step():
    code = ("import sys; from raygpt.bench import gpu_check; import raygpt.training.step; "
            "print(gpu_check.train_step is raygpt.training.step.train_step)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "True"


def test_step_seed_differs_by_every_part():
    seeds = {step_seed(1, 0, 0, 0), step_seed(2, 0, 0, 0), step_seed(1, 1, 0, 0), step_seed(1, 0, 1, 0),
             step_seed(1, 0, 0, 1)}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)


def test_the_prefetcher_reads_ahead_one_batch_and_changes_nothing_else():
    from raygpt.training.step import DevicePrefetcher

    reads = []

    def source():
        for i in range(3):
            reads.append(i)
            yield torch.full((2, 4), i), torch.full((2, 4), i + 1)

    batches = DevicePrefetcher(source(), torch.device("cpu"))
    assert reads == []
    batches.prefetch()
    batches.prefetch()  # one batch ahead at most
    assert reads == [0]
    assert [int(x[0, 0]) for x, _ in batches] == [0, 1, 2]
    batches.prefetch()  # past the end: nothing, and iteration stays finished
    with pytest.raises(StopIteration):
        next(batches)


def test_a_step_with_the_prefetcher_is_the_step_without_it():
    from raygpt.training.step import DevicePrefetcher

    def run(wrap):
        torch.manual_seed(0)
        model = GPTModel(embedding_dim=32, num_layers=2, num_heads=2, context_len=8, vocabulary_size=64, dropout=0.1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = [(torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i)),) * 2 for i in range(4)]
        batches = wrap(iter(data))
        for step in range(2):
            train_step(model, opt, batches, lr=1e-3, seed=step, max_norm=1.0, grad_accum_steps=2)
        return [p.detach().clone() for p in model.parameters()]

    plain = run(lambda it: it)
    ahead = run(lambda it: DevicePrefetcher(it, torch.device("cpu")))
    assert all(torch.equal(a, b) for a, b in zip(plain, ahead))
