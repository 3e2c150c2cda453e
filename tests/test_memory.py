"""The memory plan before launch (raygpt.training.memory): its terms, and what it refuses."""

from pathlib import Path

import pytest
import torch
from helpers import one_line_error

from raygpt.config import load_config
from raygpt.errors import UserError
from raygpt.model import GPTModel
from raygpt.training.memory import (
    GB,
    block_parameters,
    check_device_memory,
    check_free_memory,
    check_memory_plan,
    count_parameters,
    memory_plan,
    root_parameters,
)

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


# --- fsdp -------------------------------------------------------------------------------------

# GPT-2 XL as jobs/gpt2-small.yaml would run it (bf16 on the A10G), over 4 workers
XL = ["model.preset=gpt2-xl", "model.pad_vocab_multiple=64", "model.dropout=0.0", "run.use_gpu=true",
      "run.accelerator_type=A10G", "run.num_workers=4"]


@pytest.mark.parametrize("extra", [[], ["model.tie_embeddings=true"], ["model.qkv_bias=true"]])
def test_root_and_block_parameters_are_what_fsdp_wraps(extra):
    cfg = load_config(None, ["model.preset=tiny", "model.pad_vocab_multiple=64", *extra])
    model = GPTModel.from_config(cfg.model)
    in_blocks = {id(p) for p in model.trf_blocks.parameters()}
    assert block_parameters(cfg) == sum(p.numel() for p in model.trf_blocks[0].parameters())
    assert root_parameters(cfg) == sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)


@pytest.mark.parametrize("precision, width", [("bf16", 2), ("fp32", 4)])
def test_fsdp_shards_the_state_and_adds_the_gathered_root_and_two_blocks(precision, width):
    over = [*XL, "train.batch_size=32", "train.grad_accum_steps=2", f"train.precision={precision}"]
    ddp, fsdp = (memory_plan(load_config(None, over + [f"run.strategy={s}"])) for s in ("ddp", "fsdp"))
    cfg = load_config(None, over)
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (ddp.weights / 4, ddp.gradients / 4, ddp.optimizer / 4)
    # parameters and their gradients, both at the gathering width
    assert fsdp.gathered == 2 * width * (root_parameters(cfg) + 2 * block_parameters(cfg))
    # 2 accumulation steps: the whole model's gradients in fp32 wait for the last micro-batch
    assert fsdp.accumulated == 4 * fsdp.parameters
    assert fsdp.activations == ddp.activations and ddp.gathered == ddp.accumulated == 0
    assert fsdp.total == pytest.approx(sum(fsdp.terms().values()))
    assert fsdp.total == pytest.approx(fsdp.weights + fsdp.gradients + fsdp.optimizer + fsdp.gathered
                                       + fsdp.accumulated + fsdp.activations)
    assert "sharded over 4 workers (fsdp)" in fsdp.describe()
    assert "all-gathered parameters" in fsdp.describe() and "accumulated gradients" in fsdp.describe()
    assert "fsdp" not in ddp.describe() and "all-gathered" not in ddp.describe() and "accumulated" not in ddp.describe()
    single = memory_plan(load_config(None, [*XL, "train.batch_size=32", "run.strategy=fsdp"]))
    assert single.accumulated == 0 and "accumulated" not in single.describe()


def test_fsdp_gathers_at_most_the_blocks_there_are():
    cfg = load_config(None, ["model.preset=tiny", "model.num_layers=1", "run.strategy=fsdp", "train.precision=fp32"])
    assert memory_plan(cfg).gathered == 2 * 4 * (root_parameters(cfg) + block_parameters(cfg))


def test_a_ddp_refusal_names_the_fsdp_settings_that_fit():
    def refusal(*extra: str) -> str:
        with pytest.raises(UserError) as info:
            check_memory_plan(load_config(None, [*XL, *extra]), log=lambda *a: None)
        assert "\n" not in str(info.value)
        return str(info.value)

    # micro-batch 2: sharding alone fits
    assert refusal("train.batch_size=8").endswith("vs the A10G's 24 GB; set run.strategy=fsdp "
                                                  "(fsdp over 4 workers: 13.8 GB per worker)")
    # micro-batch 8: sharded, the activations need checkpointing too
    assert refusal("train.batch_size=32").endswith("; set run.strategy=fsdp and model.activation_checkpointing=true "
                                                   "(fsdp over 4 workers: 13.3 GB per worker)")
    # one worker: sharding needs a second one (the batch then divides over it)
    assert refusal("run.num_workers=1", "train.batch_size=2").endswith(
        "; set run.strategy=fsdp and run.num_workers=2 (fsdp over 2 workers: 17.2 GB per worker)")
    assert refusal("run.num_workers=1", "train.batch_size=3").endswith(
        "(fsdp over 2 workers: 17.2 GB per worker; train.batch_size a multiple of 2)")
    # nothing fits, however many workers
    assert "even fsdp over 64 workers with activation checkpointing needs" in refusal("model.embedding_dim=25600")


def test_an_fsdp_refusal_names_its_biggest_term_and_what_fits():
    def refusal(*extra: str) -> str:
        with pytest.raises(UserError) as info:
            check_memory_plan(load_config(None, [*XL, "run.strategy=fsdp", *extra]), log=lambda *a: None)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert refusal("run.num_workers=1", "train.batch_size=2") == (
        "the model does not fit: 33.5 GB per worker sharded over 1 worker (fsdp) vs the A10G's 24 GB, optimizer "
        "state 13.1 GB the biggest term; set run.num_workers=2 (fsdp over 2 workers: 17.2 GB per worker)")
    assert refusal("train.batch_size=32").endswith(
        "activations 25.6 GB the biggest term; set model.activation_checkpointing=true, or a smaller micro-batch "
        "(more train.grad_accum_steps; at most 5 sequences per worker fit, not 8)")
    assert refusal("train.batch_size=512", "model.activation_checkpointing=true").endswith(
        "; a smaller micro-batch (more train.grad_accum_steps, or more run.num_workers; at most 22 sequences per "
        "worker fit, not 128)")
    assert refusal("run.accelerator_type=T4", "train.precision=bf16", "train.batch_size=8",
                   "train.grad_accum_steps=2").endswith(
        "accumulated gradients 6.6 GB the biggest term; fewer train.grad_accum_steps (1: none kept) with a "
        "micro-batch that fits, or more run.num_workers for the same global batch")


def test_the_gpt2_xl_job_fits_sharded_over_both_gpu_nodes():
    said = []
    plan = check_memory_plan(load_config(str(JOBS / "gpt2-xl.yaml"), []), log=said.append)
    assert (plan.strategy, plan.num_workers, plan.device) == ("fsdp", 8, "A10G")
    assert said == [plan.describe()]  # no warning: 66% of the GPU
    assert plan.total / GB == pytest.approx(15.93, abs=0.01) and plan.gathered / GB == pytest.approx(0.90, abs=0.01)
    assert plan.accumulated == 0  # no accumulation steps: no whole gradients kept between micro-batches
    assert "15.93 GB of the A10G's 24 GB, sharded over 8 workers (fsdp)" in said[0]
    with pytest.raises(UserError, match="alone take 26.2 GB per worker"):  # what fsdp is for
        check_memory_plan(load_config(str(JOBS / "gpt2-xl.yaml"), ["run.strategy=ddp"]), log=lambda *a: None)


def test_the_free_memory_of_the_device_refuses_or_warns():
    cfg = load_config(str(JOBS / "gpt2-small.yaml"), [])  # 9.3 GB per worker
    said = []
    check_free_memory(cfg, 23 * GB, 24 * GB, "cuda:0 (NVIDIA A10G)", log=said.append)
    assert said == []
    check_free_memory(cfg, 10 * GB, 24 * GB, "cuda:0 (NVIDIA A10G)", log=said.append)
    assert len(said) == 1 and said[0].startswith("warning: the plan (9.3 GB) uses 93% of the 10.0 GB free on cuda:0")
    with pytest.raises(UserError) as info:
        check_free_memory(cfg, 8 * GB, 24 * GB, "cuda:0 (NVIDIA A10G)", log=said.append)
    assert str(info.value) == (
        "the model does not fit on cuda:0 (NVIDIA A10G): the plan needs 9.3 GB per worker but 8.0 GB of its 24.0 GB "
        "are free, 16.0 GB in use elsewhere; set model.activation_checkpointing=true, or a smaller micro-batch "
        "(more train.grad_accum_steps; at most 6 sequences per worker fit, not 8)")
    # a GPU smaller than the one the job is sized for: the model's state alone is too big, so sharding
    # (over 5 workers: its 4 accumulation steps keep 3.1 GB of whole gradients at any worker count)
    with pytest.raises(UserError, match=r"of its 12\.0 GB are free; set run.strategy=fsdp and run.num_workers=5 and "
                                        r"model.activation_checkpointing=true \(fsdp over 5 workers: 10\.7 GB per "
                                        r"worker; train.batch_size a multiple of 20\)"):
        check_free_memory(load_config(str(JOBS / "gpt2-small.yaml"), ["model.preset=gpt2-large"]), 12 * GB,
                          12 * GB, "cuda:0", log=said.append)


def test_the_device_check_reads_the_free_memory_of_a_cuda_device_only(monkeypatch):
    cfg = load_config(str(JOBS / "gpt2-small.yaml"), ["model.preset=gpt2-xl"])  # fits no GPU it could be on
    check_device_memory(cfg, torch.device("cpu"), log=lambda *a: None)  # nothing to check
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (20 * GB, 24 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2 * GB)  # ours: the plan counts it
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A10G")
    with pytest.raises(UserError, match=r"^the model does not fit on cuda:1 \(NVIDIA A10G\): the plan needs 51\.8 GB "
                                        r"per worker but 22\.0 GB of its 24\.0 GB are free, 2\.0 GB in use elsewhere"):
        check_device_memory(cfg, torch.device("cuda", 1), log=lambda *a: None)
    assert asked == [torch.device("cuda", 1)]
