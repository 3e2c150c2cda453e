import math

import pytest
import torch

from raygpt.training.schedule import clip_gradients, should_clip, warmup_cosine_lr

SEED = dict(total_steps=100, warmup_steps=15, initial_lr=0.0001, peak_lr=0.01, min_lr=1e-6)


def test_warmup_rises_linearly_by_0_00066_per_step():
    lrs = [warmup_cosine_lr(step, **SEED) for step in range(16)]
    assert lrs[0] == pytest.approx(0.0001)
    for a, b in zip(lrs[:15], lrs[1:16]):
        assert b - a == pytest.approx(0.00066)
    assert lrs[15] == pytest.approx(0.01)  # warmup ends at the peak


def test_cosine_decay_matches_the_recipe_formula():
    for step in (15, 20, 57, 99, 100):
        progress = (step - 15) / (100 - 15)
        expected = 1e-6 + (0.01 - 1e-6) * 0.5 * (1 + math.cos(math.pi * progress))
        assert warmup_cosine_lr(step, **SEED) == pytest.approx(expected, rel=1e-12)
    assert warmup_cosine_lr(100, **SEED) == pytest.approx(1e-6)
    assert warmup_cosine_lr(57, **SEED) == pytest.approx((0.01 + 1e-6) / 2, rel=0.05)


def test_lr_stays_at_min_past_total_steps():
    assert warmup_cosine_lr(150, **SEED) == pytest.approx(1e-6)


def test_no_warmup():
    assert warmup_cosine_lr(0, 10, 0, 0.0, 1.0, 0.0) == pytest.approx(1.0)


def test_clip_rule_uses_greater_or_equal():
    assert not should_clip(14, 15)
    assert should_clip(15, 15)  # the recipe's original `>` would skip this step
    assert should_clip(0, 15, clip_during_warmup=True)


def test_clipping_vector_from_the_recipe():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    p.grad = torch.tensor([[1.0, 2.0], [2.0, 4.0]])  # ||G||_2 = 5
    norm = clip_gradients([p], max_norm=2.0)
    assert norm.item() == pytest.approx(5.0)
    assert torch.allclose(p.grad, torch.tensor([[1.0, 2.0], [2.0, 4.0]]) * 2 / 5)
