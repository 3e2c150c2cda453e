"""µP (model.parametrization: mup): the per-parameter learning rates and init against the `mup`
package's reference implementation, the attention and readout scales, the standard
parametrization left as it was, export to GPT-2 with the same logits, resume refused across
parametrizations (fast, no Ray)."""

import math

import pytest
import torch

from raygpt.config import OptimConfig, load_config
from raygpt.errors import UserError
from raygpt.model import GPTModel
from raygpt.training.loop import build_optimizer


def mup_model(width, base=32, **kw):
    torch.manual_seed(0)
    shape = dict(num_layers=2, num_heads=4, context_len=16, vocabulary_size=100, dropout=0.0)
    return GPTModel(embedding_dim=width, parametrization="mup", mup_base_width=base, **(shape | kw))


def lr_of(optimizer, lr=1.0):
    """parameter id -> the lr it steps at (train_step applies each group's lr_scale)."""
    return {id(p): lr * g.get("lr_scale", 1.0) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("decay_matrices_only", [False, True])
def test_learning_rates_match_the_mup_packages_adam(decay_matrices_only):
    """The `mup` package (Yang et al.'s reference) scales Adam's lr by 1/width_mult for
    parameters with two infinite dimensions; the same model given base shapes must get the same
    per-parameter lr from raygpt's optimizer."""
    mup = pytest.importorskip("mup")

    def with_mup_readout(model):  # the package insists its readout class marks the output layer
        head = model.out_head
        model.out_head = mup.MuReadout(head.in_features, head.out_features, bias=False)
        return model

    base, delta, model = (with_mup_readout(mup_model(w)) for w in (32, 48, 128))
    mup.set_base_shapes(model, base, delta=delta)
    theirs = {id(p): g["lr"] for g in mup.MuAdam(model.parameters(), lr=1.0).param_groups for p in g["params"]}
    ours = lr_of(build_optimizer(model, OptimConfig(peak_lr=1.0, decay_matrices_only=decay_matrices_only)))
    names = {id(p): n for n, p in model.named_parameters()}
    assert ours.keys() == theirs.keys()
    for pid, lr in theirs.items():
        assert ours[pid] == pytest.approx(lr), names[pid]
    assert {names[p] for p, lr in ours.items() if lr != 1.0} == {
        f"trf_blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.out_proj", "ff.fc", "ff.proj")}


def test_hidden_init_shrinks_as_one_over_sqrt_fan_in_and_the_rest_stays():
    small, big = mup_model(32), mup_model(128)  # width_mult 1 and 4
    std = lambda m, name: dict(m.named_parameters())[name].std().item()  # noqa: E731
    assert std(big, "trf_blocks.0.ff.fc.weight") == pytest.approx(std(small, "trf_blocks.0.ff.fc.weight") / 2, rel=0.1)
    assert std(big, "tok_emb.weight") == pytest.approx(0.02, rel=0.05)
    assert std(big, "out_head.weight") == pytest.approx(0.02, rel=0.05)


def test_attention_is_scaled_by_one_over_d_head_and_the_readout_by_one_over_width_mult():
    model = mup_model(128).eval()  # width_mult 4, d_head 32
    assert model.trf_blocks[0].attn.scale == 1 / 32
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        hidden = model.final_norm(model.trf_blocks(model.tok_emb(x) + model.pos_emb(torch.arange(16))))
        assert torch.allclose(model(x), model.out_head(hidden) / 4)


def test_the_standard_parametrization_is_as_it_was():
    torch.manual_seed(0)
    before = GPTModel(embedding_dim=32, num_layers=2, num_heads=4, context_len=16, vocabulary_size=100)
    torch.manual_seed(0)
    after = GPTModel(embedding_dim=32, num_layers=2, num_heads=4, context_len=16, vocabulary_size=100,
                     parametrization="standard", mup_base_width=7)
    assert after.width_mult == 1.0 and after.trf_blocks[0].attn.scale is None
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    assert all("lr_scale" not in g for g in build_optimizer(after, OptimConfig()).param_groups)


def test_a_mup_model_exports_to_gpt2_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from raygpt import hf

    model = mup_model(64, base=32, qkv_bias=True, vocabulary_size=50257).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.export(model, tmp_path / "hf")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("overrides, says", [
    (["model.parametrization=mu"], "model.parametrization must be one of standard, mup, got 'mu'"),
    (["model.parametrization=mup", "model.tie_embeddings=true"], "untie it"),
    (["model.mup_base_width=0"], "model.mup_base_width must be > 0"),
])
def test_bad_mup_settings_are_one_line(overrides, says):
    with pytest.raises(UserError, match=says):
        load_config(None, overrides)


def test_a_checkpoint_resumes_only_in_its_own_parametrization():
    from raygpt.checkpoint import check_same_shape

    standard = load_config(None, ["model.preset=tiny"]).model
    mup = load_config(None, ["model.preset=tiny", "model.parametrization=mup"]).model
    new_keys = ("parametrization", "mup_base_width")
    saved_before_mup_existed = {k: v for k, v in vars(standard).items() if k not in new_keys}
    check_same_shape(saved_before_mup_existed, standard, "c")  # an older checkpoint: standard
    with pytest.raises(UserError, match="parametrization standard vs mup"):
        check_same_shape(saved_before_mup_existed, mup, "c")
    with pytest.raises(UserError, match="mup_base_width 64 vs 128"):
        check_same_shape({**vars(mup), "mup_base_width": 64}, mup, "c")
    assert math.isclose(GPTModel.from_config(mup).width_mult, 1.0)  # tiny is the default base width


def test_a_searched_optimizer_section_carries_to_a_bigger_model_of_the_same_parametrization(tmp_path):
    import yaml

    small = load_config(None, ["model.preset=tiny", "model.parametrization=mup", "optim.peak_lr=0.0123",
                               "optim.warmup_steps=7", "train.batch_size=4"])
    (tmp_path / "best_config.yaml").write_text(yaml.safe_dump(small.to_dict()))
    big = ["model.preset=gpt2-small", "model.parametrization=mup"]
    cfg = load_config(None, big, set_from=tmp_path / "best_config.yaml")
    assert (cfg.optim.peak_lr, cfg.optim.warmup_steps, cfg.model.embedding_dim) == (0.0123, 7, 768)
    assert cfg.train.batch_size != 4  # only --keys' sections (optim by default)
    assert load_config(None, big + ["optim.peak_lr=0.001"], set_from=tmp_path / "best_config.yaml").optim.peak_lr \
        == 0.001  # --set still wins
    with pytest.raises(UserError, match="its model.parametrization is 'mup', this config's 'standard'"):
        load_config(None, ["model.preset=gpt2-small"], set_from=tmp_path / "best_config.yaml")
    with pytest.raises(UserError, match="its model.mup_base_width is 128, this config's 256"):
        load_config(None, big + ["model.mup_base_width=256"], set_from=tmp_path / "best_config.yaml")
    with pytest.raises(UserError, match="--keys takes sections of optim, train, got model"):
        load_config(None, big, set_from=tmp_path / "best_config.yaml", keys=("model",))


@pytest.mark.slow
def test_the_coordinate_check_is_flat_under_mup_and_grows_under_standard(tmp_path):
    """Widths 64 -> 512, 3 AdamW steps at lr 0.01: after the steps, each hidden layer type's
    mean |activation| grows with width under the standard parametrization and stays within a few
    x under µP (the full check: `raygpt bench mup-coord`)."""
    pytest.importorskip("matplotlib")
    from raygpt.bench.mup_coord import bench_mup_coord

    result = bench_mup_coord([64, 512], steps=3, out=str(tmp_path), log=lambda line: None)
    for layer in ("attention", "mlp", "block"):
        assert result["growth"]["standard"][layer] > 8, (layer, result["growth"])
        assert result["growth"]["mup"][layer] < 3, (layer, result["growth"])
    assert (tmp_path / "mup_coord.png").stat().st_size > 10_000
    with pytest.raises(UserError, match="--widths must be positive multiples of 32"):
        bench_mup_coord([48], out=str(tmp_path))
