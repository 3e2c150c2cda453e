"""The step plan: micro-batch and step counts, and the configs it refuses (raygpt.training.plan)."""

import pytest

from raygpt.config import TrainConfig
from raygpt.errors import UserError
from raygpt.training.plan import plan_steps


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
