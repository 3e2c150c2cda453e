import pytest
import torch

from raygpt.model import PRESETS, GPTModel


def tiny(**kw) -> GPTModel:
    torch.manual_seed(0)
    cfg = dict(embedding_dim=32, num_layers=2, num_heads=4, context_len=16, vocabulary_size=100, dropout=0.0)
    return GPTModel(**{**cfg, **kw})


def test_logits_shape():
    model = tiny()
    logits = model(torch.randint(0, 100, (3, 16)))
    assert logits.shape == (3, 16, 100)


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="context_len"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_causal_masking():
    model = tiny().eval()
    x = torch.randint(0, 100, (2, 16))
    t = 9
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % 100
    a, b = model(x), model(y)
    assert torch.equal(a[:, :t], b[:, :t])  # nothing before t can see position t
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_embedding_dim_must_divide_over_heads():
    with pytest.raises(ValueError, match="divisible"):
        tiny(embedding_dim=30)


def test_gpt2_small_parameter_counts():
    # The recipe's series: untied, no qkv bias.
    with torch.device("meta"):
        assert GPTModel(**PRESETS["gpt2-small"], dropout=0.1, qkv_bias=False).num_parameters() == 163_009_536
        # The original GPT-2: tied head, qkv bias.
        original = GPTModel(**PRESETS["gpt2-small"], qkv_bias=True, tie_embeddings=True)
        assert original.num_parameters() == 124_439_808


@pytest.mark.parametrize(
    "preset, count",
    [("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_larger_presets_match_openai_gpt2(preset, count):
    with torch.device("meta"):  # shapes only: no memory for 1.5B parameters
        assert GPTModel(**PRESETS[preset], qkv_bias=True, tie_embeddings=True).num_parameters() == count


def test_tiny_preset_is_small():
    assert GPTModel(**PRESETS["tiny"]).num_parameters() < 20_000_000


def test_tied_head_shares_the_embedding():
    model = tiny(tie_embeddings=True)
    assert model.out_head.weight is model.tok_emb.weight


def test_gpt2_initialisation():
    torch.manual_seed(0)
    model = GPTModel(embedding_dim=256, num_layers=8, num_heads=4, context_len=64, vocabulary_size=5000)
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 1e-3
    resid = model.trf_blocks[0].ff.proj.weight.std().item()
    assert abs(resid - 0.02 / (2 * 8) ** 0.5) < 1e-3
    assert torch.count_nonzero(model.trf_blocks[0].ff.fc.bias) == 0


def test_generate_greedy_is_deterministic_and_appends():
    model = tiny()
    idx = torch.tensor([[1, 2, 3]])
    a = model.generate(idx, max_new_tokens=20)
    assert a.shape == (1, 23) and torch.equal(a[:, :3], idx)
    assert torch.equal(a, model.generate(idx, max_new_tokens=20))


def test_generate_sampling_repeats_with_a_seed():
    model = tiny()
    idx = torch.tensor([[1, 2, 3]])
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(model.generate(idx, max_new_tokens=30, temperature=1.5, top_k=50))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_generate_top_k_one_is_greedy():
    model = tiny()
    idx = torch.tensor([[5, 6]])
    assert torch.equal(
        model.generate(idx, 10, temperature=0.8, top_k=1), model.generate(idx, 10, temperature=0.0)
    )


def test_generate_stops_at_eos():
    model = tiny()
    idx = torch.tensor([[1, 2, 3]])
    first = model.generate(idx, max_new_tokens=1)[0, -1].item()
    out = model.generate(idx, max_new_tokens=10, eos_id=first)
    assert out.shape == (1, 4) and out[0, -1].item() == first


def test_generate_keeps_training_mode():
    model = tiny().train()
    model.generate(torch.tensor([[1]]), 2)
    assert model.training


def test_activation_checkpointing_recomputes_to_the_same_loss_and_gradients():
    def loss_and_grads(checkpointing):
        torch.manual_seed(0)
        model = GPTModel(embedding_dim=32, num_layers=3, num_heads=2, context_len=16, vocabulary_size=100,
                         dropout=0.1)
        model.activation_checkpointing = checkpointing
        calls, ff = [], model.trf_blocks[0].ff.forward
        model.trf_blocks[0].ff.forward = lambda h: calls.append(1) or ff(h)
        x = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)  # dropout draws the same masks when a block is recomputed
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward, not stored
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain, recomputed = loss_and_grads(False), loss_and_grads(True)
    assert torch.equal(plain[0], recomputed[0])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(plain[1], recomputed[1]))
