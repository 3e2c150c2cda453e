"""The speed options: each trains like the plain path (bf16 within a looser tolerance), and
checkpoints move between compiled / plain and padded / unpadded models."""

import json

import pytest
import torch
from helpers import make_corpus, tiny_config

from raygpt import checkpoint as ckpt
from raygpt.model import GPTModel
from raygpt.runs import read_events, read_metrics
from raygpt.training import speed
from raygpt.training.local import run_without_ray


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def losses(data_dir, run_dir, *overrides):
    torch.set_num_threads(1)
    cfg = tiny_config(data_dir, run_dir.parent, "train.max_steps=8", "train.eval_freq=2", "train.save_freq=8",
                      *overrides)
    run_without_ray(cfg, str(data_dir), str(run_dir))
    return [(r["train_loss"], r["val_loss"]) for r in read_metrics(str(run_dir))]


@pytest.fixture(scope="module")
def plain(data_dir, tmp_path_factory):
    return losses(data_dir, tmp_path_factory.mktemp("plain") / "run")


def test_auto_precision_is_fp32_on_cpu_and_bf16_only_when_asked():
    cpu = torch.device("cpu")
    assert speed.resolve_precision("auto", cpu) == "fp32"
    assert speed.resolve_precision("bf16", cpu) == "bf16"
    assert speed.fused_adamw(None, cpu) and not speed.fused_adamw(False, cpu)
    assert speed.fused_adamw(None, torch.device("cuda"))
    assert not speed.fused_adamw(None, torch.device("meta"))


@pytest.mark.parametrize("overrides, tolerance", [
    (["optim.fused=false"], 1e-4),  # foreach AdamW against the default fused one
    (["model.pad_vocab_multiple=64"], 1e-4),
    (["train.precision=bf16"], 0.05),
])
def test_a_fast_path_trains_like_the_plain_one(data_dir, plain, tmp_path, overrides, tolerance):
    fast = losses(data_dir, tmp_path / "run", *overrides)
    assert len(fast) == len(plain) == 5
    assert plain[-1][1] < plain[0][1] - 0.5  # it learned something
    for (tl, vl), (ftl, fvl) in zip(plain, fast):
        assert abs(tl - ftl) <= tolerance and abs(vl - fvl) <= tolerance, (plain, fast)


@pytest.mark.slow  # torch.compile on 2 CPU cores: tens of seconds
def test_compiled_training_matches_and_its_checkpoint_loads_into_a_plain_model(data_dir, plain, tmp_path):
    fast = losses(data_dir, tmp_path / "run", "train.compile=true")
    for (tl, vl), (ftl, fvl) in zip(plain, fast):
        assert abs(tl - ftl) <= 1e-3 and abs(vl - fvl) <= 1e-3, (plain, fast)
    loaded = ckpt.load_checkpoint(tmp_path / "run" / "checkpoint_0000008")
    assert not any(k.startswith("_orig_mod.") for k in loaded["model"])
    GPTModel(embedding_dim=32, num_layers=2, num_heads=2, context_len=16).load_state_dict(loaded["model"])


def test_a_compiled_models_state_dict_loads_into_a_plain_one_and_back(tmp_path):
    torch.manual_seed(0)
    plain = GPTModel(embedding_dim=32, num_layers=2, num_heads=2, context_len=16, vocabulary_size=100)
    compiled = torch.compile(GPTModel(embedding_dim=32, num_layers=2, num_heads=2, context_len=16, vocabulary_size=100))
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())  # what a hand-saved one holds
    torch.save(compiled.state_dict(), tmp_path / "model.pt")
    torch.save({}, tmp_path / "optimizer.pt")
    (tmp_path / "state.json").write_text(json.dumps({"config": {"model": {}}}))
    plain.load_state_dict(ckpt.load_checkpoint(tmp_path)["model"])  # prefixes stripped on load
    compiled._orig_mod.load_state_dict(ckpt.unwrapped_state_dict(plain))
    for a, b in zip(plain.parameters(), compiled.parameters()):
        assert torch.equal(a, b)


def test_padded_and_unpadded_checkpoints_give_the_same_logits():
    shape = dict(embedding_dim=32, num_layers=2, num_heads=2, context_len=16, vocabulary_size=100, dropout=0.0)
    torch.manual_seed(0)
    unpadded = GPTModel(**shape).eval()
    torch.manual_seed(0)
    padded = GPTModel(**shape, pad_vocab_multiple=64).eval()
    assert padded.out_head.weight.shape[0] == 128 and padded.num_parameters() == unpadded.num_parameters()
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert padded(idx).shape == (2, 16, 100)
        # Same seed, same real rows: the padded model starts as the same function.
        assert torch.allclose(padded(idx), unpadded(idx), atol=1e-6)
        # Both ways: unpadded -> padded (zero rows added) and padded -> unpadded (rows cut).
        other = GPTModel(**shape, pad_vocab_multiple=64).eval()
        other.load_state_dict(unpadded.state_dict())
        assert torch.allclose(other(idx), unpadded(idx), atol=1e-6)
        back = GPTModel(**shape).eval()
        back.load_state_dict(other.state_dict())
        assert torch.allclose(back(idx), unpadded(idx), atol=1e-6)


def test_resume_across_a_padding_change_fits_the_optimizer_state_too(data_dir, tmp_path):
    run = tmp_path / "run"
    losses(data_dir, run, "train.max_steps=4", "train.save_freq=4")
    rows = losses(data_dir, run, "train.max_steps=8", "model.pad_vocab_multiple=64")
    (event,) = read_events(str(run))
    assert event["restored_step"] == 4
    assert len(rows) == 5 and all(v == v for _, v in rows)  # resumed and trained on, no NaN


def test_reports_carry_throughput_and_mfu(data_dir, tmp_path):
    losses(data_dir, tmp_path / "run")
    rows = read_metrics(str(tmp_path / "run"))
    assert rows[0]["mfu"] is None and rows[0]["step_time"] == 0.0  # the untrained model: no steps yet
    for r in rows[1:]:
        assert r["tokens_per_s_per_device"] == r["tokens_per_s"] > 0 and r["step_time"] > 0
        assert 0 < r["mfu"] < 1


@pytest.mark.parametrize("capability, expected",
                         [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_only_where_tensor_cores_run_it(monkeypatch, capability, expected):
    # torch counts emulated bf16 as supported; below compute capability 8 (V100, T4) it is slower than fp32.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert speed.resolve_precision("auto", torch.device("cuda", 0)) == expected
    assert speed.resolve_precision("auto", torch.device("cpu")) == "fp32"
