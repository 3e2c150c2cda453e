"""`raygpt generate`: the options it accepts and the checkpoints it refuses (fast, no Ray: a tiny
hand-made checkpoint)."""

import json
from pathlib import Path

import pytest
import torch
from helpers import one_line_error

from raygpt.checkpoint import load_checkpoint, save_checkpoint
from raygpt.errors import UserError
from raygpt.model import GPTModel

MODEL = dict(embedding_dim=16, num_layers=1, num_heads=2, context_len=8, vocabulary_size=50257, dropout=0.0,
             qkv_bias=False, tie_embeddings=False, pad_vocab_multiple=1)


def make_checkpoint(folder: Path, weights: dict | None = None, **config) -> Path:
    """A whole checkpoint of a tiny model: MODEL (with `config`) in state.json, and `weights`
    (default: a model built from that config) in model.pt."""
    torch.manual_seed(0)
    cfg = {**MODEL, **config}
    model = GPTModel(**cfg)
    save_checkpoint(folder, model, None, {"step": 1, "config": {"model": cfg}})
    if weights is not None:
        torch.save(weights, folder / "model.pt")
    return folder


def weights_of(**config) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return GPTModel(**{**MODEL, **config}).state_dict()


def edit_model_config(folder: Path, **changes) -> None:
    state = json.loads((folder / "state.json").read_text())
    state["config"]["model"].update(changes)
    (folder / "state.json").write_text(json.dumps(state))


def generate(run_cli, folder, *options):
    return run_cli("generate", "--checkpoint", str(folder), "--prompt", "def", "--max-new-tokens", "3", *options)


@pytest.fixture
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "checkpoint_0000001")


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("temperature", ["1e-45", "5e-324", "0.00009", "nan", "inf", "-inf", "-1"])
def test_a_temperature_that_cannot_sample_is_refused(run_cli, ckpt, temperature):
    """1e-45 made logits / temperature infinite (NaN probabilities); nan was silently greedy."""
    err = one_line_error(run_cli, "generate", "--checkpoint", str(ckpt), "--prompt", "x",
                         f"--temperature={temperature}")
    assert "--temperature must be 0 (greedy) or a finite number >= 0.0001" in err and "got" in err


@pytest.mark.parametrize("temperature", ["0", "0.0001", "1", "1e30"])
def test_temperatures_at_the_ends_of_the_allowed_range_sample(run_cli, ckpt, temperature):
    code, out, err = generate(run_cli, ckpt, "--temperature", temperature, "--seed", "1")
    assert code == 0, err
    assert out.startswith("def")


def test_a_tiny_temperature_samples_as_greedy(run_cli, ckpt):
    greedy = generate(run_cli, ckpt)[1]
    assert generate(run_cli, ckpt, "--temperature", "0.0001", "--seed", "3")[1] == greedy


@pytest.mark.parametrize("seed", [str(2**64), str(10**30), "-1"])
def test_a_seed_out_of_range_is_refused(run_cli, ckpt, seed):
    err = one_line_error(run_cli, "generate", "--checkpoint", str(ckpt), "--prompt", "x", "--temperature", "1",
                         f"--seed={seed}")
    assert f"--seed must be an integer from 0 to 2**64 - 1 (18446744073709551615), got {seed}" in err


def test_the_largest_seed_samples_reproducibly(run_cli, ckpt):
    options = ("--temperature", "1", "--seed", str(2**64 - 1))
    code, out, err = generate(run_cli, ckpt, *options)
    assert code == 0, err
    assert generate(run_cli, ckpt, *options)[1] == out


# ----------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize("damage, said", [
    (lambda w: {**w, "tok_emb.weight": "weights"}, "'tok_emb.weight' is a str, not a tensor"),
    (lambda w: {**w, "trf_blocks.0.ff.fc.bias": 3}, "'trf_blocks.0.ff.fc.bias' is a int, not a tensor"),
    (lambda w: {**w, "extra": {"nested": torch.zeros(1)}}, "'extra' is a dict, not a tensor"),
    (lambda w: list(w.values()), "it holds a list, not a state dict"),
    (lambda w: torch.zeros(3), "it holds a Tensor, not a state dict"),
])
def test_a_model_pt_holding_something_else_than_tensors_is_refused(run_cli, tmp_path, damage, said):
    folder = make_checkpoint(tmp_path / "checkpoint_0000001", damage(weights_of()))
    err = one_line_error(run_cli, "generate", "--checkpoint", str(folder), "--prompt", "x")
    assert f"checkpoint {folder} is damaged: model.pt is not a state dict of tensors" in err and said in err
    with pytest.raises(UserError, match="is damaged: model.pt is not a state dict of tensors"):
        load_checkpoint(folder, with_optimizer=False)


@pytest.mark.parametrize("weights, config, said", [
    # bias tensors in the weights, but state.json says there are none (strict loading: a traceback)
    (dict(qkv_bias=True), dict(qkv_bias=False), "qkv_bias False, but model.pt holds trf_blocks.0.attn.qkv.bias"),
    (dict(qkv_bias=False), dict(qkv_bias=True), "qkv_bias True, but model.pt has no trf_blocks.0.attn.qkv.bias"),
    # an untied model's head differs from its embedding: loaded as tied, one of them was dropped silently
    (dict(tie_embeddings=False), dict(tie_embeddings=True),
     "tie_embeddings True, but model.pt's out_head.weight differs from its tok_emb.weight"),
    (dict(), dict(qkv_bias="yes"), "qkv_bias 'yes' is not true or false"),
    (dict(), dict(tie_embeddings=1), "tie_embeddings 1 is not true or false"),
])
def test_a_state_that_says_otherwise_than_its_weights_is_refused(run_cli, tmp_path, weights, config, said):
    folder = make_checkpoint(tmp_path / "checkpoint_0000001", weights_of(**weights))
    edit_model_config(folder, **config)
    err = one_line_error(run_cli, "generate", "--checkpoint", str(folder), "--prompt", "x")
    assert "state.json's model config does not match model.pt" in err and said in err


@pytest.mark.parametrize("damage, said", [
    (lambda w: {k: v for k, v in w.items() if k != "trf_blocks.0.ff.proj.weight"},
     "model.pt has no trf_blocks.0.ff.proj.weight"),
    (lambda w: {**w, "trf_blocks.0.attn.extra": torch.zeros(2)}, "model.pt holds trf_blocks.0.attn.extra"),
    (lambda w: {**w, "trf_blocks.0.ff.fc.weight": torch.zeros(3, 16)},
     "trf_blocks.0.ff.fc.weight is (3, 16) in model.pt, (64, 16) for the config"),
    (lambda w: {**w, "final_norm.weight": torch.ones(16, dtype=torch.int64)},
     "final_norm.weight is a torch.int64 tensor, not floating point"),
])
def test_weights_that_do_not_fit_the_model_are_refused_in_one_line(run_cli, tmp_path, damage, said):
    folder = make_checkpoint(tmp_path / "checkpoint_0000001", damage(weights_of()))
    err = one_line_error(run_cli, "generate", "--checkpoint", str(folder), "--prompt", "x")
    assert "state.json's model config does not match model.pt" in err and said in err


def test_a_tied_model_and_a_tied_model_read_as_untied_generate(run_cli, tmp_path):
    """Tied weights (head and embedding equal) under tie_embeddings false compute the same
    function: accepted (a tied model may be trained on untied)."""
    tied = make_checkpoint(tmp_path / "tied", tie_embeddings=True)
    code, out, err = generate(run_cli, tied, "--temperature", "1", "--seed", "2")
    assert code == 0, err
    edit_model_config(tied, tie_embeddings=False)
    assert generate(run_cli, tied, "--temperature", "1", "--seed", "2") == (0, out, "")


def test_dropout_is_not_in_the_weights_and_does_not_change_samples(run_cli, ckpt):
    """Sampling runs in eval mode, where dropout does nothing: any probability is accepted."""
    before = generate(run_cli, ckpt, "--temperature", "1", "--seed", "4")
    assert before[0] == 0, before[2]
    edit_model_config(ckpt, dropout=0.5)
    assert generate(run_cli, ckpt, "--temperature", "1", "--seed", "4") == before


@pytest.mark.parametrize("config, said", [
    (dict(dropout=5), "dropout 5 is not a probability in [0, 1)"),
    (dict(dropout="abc"), "dropout 'abc' is not a probability in [0, 1)"),
    (dict(dropout=None), "dropout None is not a probability in [0, 1)"),
    (dict(embedding_dim=16.0), "embedding_dim 16.0 vs 16"),
])
def test_a_model_config_value_of_the_wrong_kind_is_refused(run_cli, ckpt, config, said):
    edit_model_config(ckpt, **config)
    err = one_line_error(run_cli, "generate", "--checkpoint", str(ckpt), "--prompt", "x")
    assert "state.json's model config does not match model.pt" in err and said in err
