"""The memory plan before launch (raygpt.training.memory): its terms, and what it refuses."""

from pathlib import Path

import pytest
from helpers import one_line_error

from raygpt.config import load_config
from raygpt.errors import UserError
from raygpt.model import GPTModel
from raygpt.training.memory import GB, check_memory_plan, count_parameters, memory_plan

JOBS = Path(__file__).resolve().parent.parent / "jobs"


@pytest.mark.parametrize("extra", [[], ["model.tie_embeddings=true"], ["model.qkv_bias=true"],
                                   ["model.pad_vocab_multiple=1"]])
def test_the_parameters_are_counted_as_the_model_has_them_padding_included(extra):
    cfg = load_config(None, ["model.preset=tiny", "model.pad_vocab_multiple=64", *extra])
    model = GPTModel.from_config(cfg.model)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_a_huge_config_is_counted_at_once():
    cfg = load_config(None, ["model.num_layers=1000000", "model.embedding_dim=65536", "model.num_heads=1"])
    assert count_parameters(cfg) > 10**15


def test_state_is_16_bytes_per_parameter_and_checkpointing_shrinks_only_activations():
    cfg = load_config(None, ["model.preset=gpt2-small", "train.batch_size=16", "run.num_workers=2"])
    plan = memory_plan(cfg)
    assert (plan.weights, plan.gradients, plan.optimizer) == (4 * plan.parameters, 4 * plan.parameters,
                                                              8 * plan.parameters)
    lean = memory_plan(load_config(None, ["model.preset=gpt2-small", "train.batch_size=16", "run.num_workers=2",
                                          "model.activation_checkpointing=true"]))
    assert lean.weights == plan.weights and lean.activations < 0.6 * plan.activations  # the head stays
    half = memory_plan(load_config(None, ["model.preset=gpt2-small", "train.batch_size=16", "run.num_workers=2",
                                          "train.grad_accum_steps=2"]))
    assert half.activations == pytest.approx(plan.activations / 2)


def test_gpt2_xl_on_the_shipped_a10g_cluster_is_refused_naming_its_26_gb():
    cfg = load_config(str(JOBS / "gpt2-small.yaml"), ["model.preset=gpt2-xl"])
    with pytest.raises(UserError, match=r"alone take 26\.2 GB per worker .* vs the A10G's 24 GB") as info:
        check_memory_plan(cfg, log=lambda *a: None)
    assert "\n" not in str(info.value)


def test_activations_that_do_not_fit_point_at_checkpointing_then_the_micro_batch():
    over = ["model.preset=gpt2-medium", "train.batch_size=64", "run.num_workers=1", "train.grad_accum_steps=1",
            "run.use_gpu=true", "run.accelerator_type=A10G", "train.precision=bf16"]
    with pytest.raises(UserError, match="activations .* the biggest term; set model.activation_checkpointing=true"):
        check_memory_plan(load_config(None, over), log=lambda *a: None)
    with pytest.raises(UserError, match="a smaller micro-batch"):
        check_memory_plan(load_config(None, over + ["model.activation_checkpointing=true", "train.batch_size=512"]),
                          log=lambda *a: None)


def test_the_gpt2_small_job_fits_and_its_plan_is_printed():
    said = []
    plan = check_memory_plan(load_config(str(JOBS / "gpt2-small.yaml"), []), log=said.append)
    assert plan.total < 24 * GB and said[0].startswith("memory per worker: ") and "A10G's 24 GB" in said[0]


def test_the_cli_refuses_before_looking_at_the_data(run_cli):
    err = one_line_error(run_cli, "train", "--check", "--config", str(JOBS / "gpt2-small.yaml"),
                         "--set", "model.preset=gpt2-xl")  # its data.dir is a bucket this machine cannot reach
    assert "26.2 GB" in err and "24 GB" in err


def test_an_unknown_accelerator_type_is_refused():
    with pytest.raises(UserError, match="run.accelerator_type must be one of A10G"):
        load_config(None, ["run.accelerator_type=GTX480"])
