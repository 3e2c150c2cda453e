"""Hugging Face GPT-2 format: export parity with transformers, import, round trip (no download)."""

import json

import pytest
import torch
from helpers import prose_documents

from raygpt import hf
from raygpt.data.prepare import encode_document
from raygpt.errors import UserError
from raygpt.model import GPTModel
from raygpt.tokenizer import EOT_ID, gpt2_encoding

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install 'raygpt[hf]'")


def trained_like(**kw) -> GPTModel:
    """A small model with every weight random (biases and LayerNorms too), as after training."""
    torch.manual_seed(0)
    shape = dict(embedding_dim=64, num_layers=2, num_heads=4, context_len=32, dropout=0.0)
    model = GPTModel(**(shape | kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_model(folder):
    return transformers.GPT2LMHeadModel.from_pretrained(folder, local_files_only=True).eval()


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True}, {"tie_embeddings": True}, {"pad_vocab_multiple": 64}])
def test_exported_logits_and_greedy_ids_match_transformers(tmp_path, kw):
    model = trained_like(**kw)
    hf.export(model, tmp_path / "hf")
    theirs = hf_model(tmp_path / "hf")
    assert theirs.config.tie_word_embeddings == model.cfg.tie_embeddings
    ids = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, their_logits = model(ids), theirs(ids).logits
    assert their_logits.shape == ours_logits.shape == (2, 32, 50257)  # a padded vocabulary exports unpadded
    assert (ours_logits - their_logits).abs().max() < 1e-4
    prompt = ids[:1, :8]
    ours = model.generate(prompt, max_new_tokens=20)
    theirs_ids = theirs.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                 pad_token_id=EOT_ID, eos_token_id=None)
    assert ours.tolist() == theirs_ids.tolist()


def test_the_exported_tokenizer_encodes_like_raygpts(tmp_path):
    hf.export(trained_like(), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    samples = prose_documents()[:5] + ["def f(x):\n    return x ** 2  # café, 日本語\n\n\n   spaces"]
    for text in samples:
        assert tok(text)["input_ids"] == gpt2_encoding().encode_ordinary(text)
    assert tok.eos_token_id == EOT_ID and tok.decode([EOT_ID]) == "<|endoftext|>"


def test_a_transformers_gpt2_imports_with_identical_logits_and_round_trips_exactly(tmp_path):
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=50257,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    torch.manual_seed(3)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = GPTModel(embedding_dim=64, num_layers=2, num_heads=4, context_len=32, dropout=0.0, qkv_bias=True,
                    tie_embeddings=True).eval()
    hf.load_into(ours, tmp_path / "theirs")
    ids = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4
    hf.export(ours, tmp_path / "again")
    import safetensors.torch as st

    first, second = (st.load_file(tmp_path / "theirs" / "model.safetensors"),
                     st.load_file(tmp_path / "again" / "model.safetensors"))
    assert set(second) <= set(first)
    assert all(torch.equal(first[k], second[k]) for k in second)  # bit-exact


def test_a_folder_of_another_shape_is_refused_naming_the_difference(tmp_path):
    hf.export(trained_like(), tmp_path / "hf")
    other = GPTModel(embedding_dim=64, num_layers=3, num_heads=4, context_len=32)
    with pytest.raises(UserError, match=r"num_layers 3 vs 2"):
        hf.load_into(other, tmp_path / "hf")
    with pytest.raises(UserError, match="no config.json there"):
        hf.load_into(other, tmp_path)


def test_export_of_a_trained_checkpoint_from_the_cli(run_cli, tmp_path):
    from helpers import make_corpus, tiny_config

    from raygpt.training.local import run_without_ray

    data = make_corpus(tmp_path)
    run_without_ray(tiny_config(data, tmp_path, "train.max_steps=4"), str(data), str(tmp_path / "run"))
    code, out, err = run_cli("export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf"))
    assert code == 0, err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["n_embd"] == 32 and config["n_layer"] == 2 and config["n_positions"] == 16
    theirs = hf_model(tmp_path / "hf")
    ids = torch.tensor([encode_document("def add(a, b):")[:-1].tolist()])
    from raygpt.generate import load_model

    ours, _ = load_model(str(tmp_path / "run"))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4


def _tiny_gpt2_folder(folder, n_layer=2):
    """A randomly initialised transformers GPT-2 of the tests' tiny shape, saved locally."""
    config = transformers.GPT2Config(n_embd=32, n_layer=n_layer, n_head=2, n_positions=16, vocab_size=50257,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    torch.manual_seed(11)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_a_run_starts_from_hugging_face_weights_not_from_its_seed(tmp_path):
    from helpers import make_corpus, tiny_config

    from raygpt.runs import read_metrics
    from raygpt.training.local import run_without_ray

    data = make_corpus(tmp_path)
    folder = _tiny_gpt2_folder(tmp_path / "gpt2")
    first = {}
    for seed in (1, 2):
        for init in (str(folder), None):
            cfg = tiny_config(data, tmp_path, "train.max_steps=4", f"train.seed={seed}",
                              *([f"model.init_from={init}"] if init else []))
            run_dir = tmp_path / f"run-{seed}-{bool(init)}"
            final = run_without_ray(cfg, str(data), str(run_dir))
            first[seed, bool(init)] = read_metrics(str(run_dir))[0]["val_loss"]
            assert final["step"] == 4
    assert first[1, True] == first[2, True]  # the same weights at step 0, whatever the seed
    assert first[1, False] != first[2, False]


def test_init_from_is_checked_before_launch(run_cli, tmp_path):
    from helpers import make_corpus, one_line_error, tiny_overrides

    data = make_corpus(tmp_path)
    wrong = _tiny_gpt2_folder(tmp_path / "three-layers", n_layer=3)
    base = ["train", "--check"] + [a for o in tiny_overrides(data, tmp_path / "runs") for a in ("--set", o)]
    err = one_line_error(run_cli, *base, "--set", f"model.init_from={wrong}")
    assert "model.init_from" in err and "num_layers 2 vs 3" in err
    err = one_line_error(run_cli, *base, "--set", f"model.init_from={tmp_path / 'nothing'}")
    assert "no config.json there" in err


def test_export_never_replaces_a_users_file_nor_writes_through_a_symlink(tmp_path):
    """The writer rule: a new or empty folder, or an earlier export (its own files replaced, each
    by a rename, so a symlink of that name is replaced and not written through)."""
    model = trained_like()
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    (user / "vocab.json").write_text("{}")
    with pytest.raises(UserError, match=r"--out .*mine holds files raygpt's export did not write"):
        hf.export(model, user)
    assert (user / "config.json").read_text() == '{"mine": true}'
    with pytest.raises(UserError, match="--out is empty"):
        hf.export(model, "")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        hf.export(model, tmp_path / "file")
    # An earlier export is replaced; a link planted in it is replaced, its target untouched.
    hf.export(model, tmp_path / "hf")
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "hf" / "merges.txt").unlink()
    (tmp_path / "hf" / "merges.txt").symlink_to(target)
    hf.export(model, tmp_path / "hf")
    assert target.read_text() == "keep me" and not (tmp_path / "hf" / "merges.txt").is_symlink()
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted(hf.EXPORT_FILES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.export-")]  # no staging left


def test_export_refuses_a_run_folder_before_reading_the_checkpoint(run_cli, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    code, out, err = run_cli("export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"))
    assert code == 2 and "holds files raygpt's export did not write (metrics.jsonl)" in err
