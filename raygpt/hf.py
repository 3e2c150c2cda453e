"""Hugging Face GPT-2 format in and out: `raygpt export` and `model.init_from`.

A raygpt model is GPT-2's architecture (pre-LayerNorm blocks, tanh GELU, learned positions, fused
qkv) under other names and with `nn.Linear` where GPT-2 has `Conv1D`, so the mapping is a rename
plus a transpose of the linear weights. Export writes what `transformers` loads offline:
`config.json`, `model.safetensors` and the GPT-2 tokenizer files built from the vendored BPE
ranks (`vocab.json`, `merges.txt`). Import reads such a folder (e.g. OpenAI's GPT-2 small
downloaded by the user) into a `GPTModel` for continued pre-training.

Needs the `hf` extra (`pip install 'raygpt[hf]'`: safetensors; transformers only to load the
result); no download ever happens here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from raygpt import storage
from raygpt.errors import UserError
from raygpt.model import GPTModel
from raygpt.tokenizer import EOT_ID, EOT_TOKEN, _load_ranks

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
# raygpt name -> GPT-2 name within block i, and whether GPT-2 stores it transposed (Conv1D).
BLOCK_NAMES = {
    "norm1.weight": ("ln_1.weight", False), "norm1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.out_proj.weight": ("attn.c_proj.weight", True), "attn.out_proj.bias": ("attn.c_proj.bias", False),
    "norm2.weight": ("ln_2.weight", False), "norm2.bias": ("ln_2.bias", False),
    "ff.fc.weight": ("mlp.c_fc.weight", True), "ff.fc.bias": ("mlp.c_fc.bias", False),
    "ff.proj.weight": ("mlp.c_proj.weight", True), "ff.proj.bias": ("mlp.c_proj.bias", False),
}
TOP_NAMES = {"tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight",
             "final_norm.weight": "transformer.ln_f.weight", "final_norm.bias": "transformer.ln_f.bias",
             "out_head.weight": "lm_head.weight"}


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("Hugging Face format needs safetensors: pip install 'raygpt[hf]'") from None
    return safetensors.torch


# ----------------------------------------------------------------------------- weights


def to_gpt2_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """GPT-2 (`GPT2LMHeadModel`) names and layouts for the model's weights: vocabulary rows
    unpadded, Conv1D weights transposed, a missing qkv bias as zeros, a tied head left out (GPT-2
    ties it on load)."""
    cfg, sd = model.cfg, dict(model.state_dict())
    vocab, d = cfg.vocabulary_size, cfg.embedding_dim
    if cfg.parametrization == "mup":  # µP folded into GPT-2's weights, exactly (`fold_mup`)
        sd = fold_mup(sd, model)
    out: dict[str, torch.Tensor] = {}
    for name, gpt2 in TOP_NAMES.items():
        if name == "out_head.weight" and cfg.tie_embeddings:
            continue
        tensor = sd[name][:vocab] if name in ("tok_emb.weight", "out_head.weight") else sd[name]
        out[gpt2] = tensor
    for i in range(cfg.num_layers):
        for name, (gpt2, transposed) in BLOCK_NAMES.items():
            tensor = sd.get(f"trf_blocks.{i}.{name}")
            if tensor is None:  # trained without qkv bias: GPT-2 always has one
                tensor = torch.zeros(3 * d)
            out[f"transformer.h.{i}.{gpt2}"] = tensor.t() if transposed else tensor
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def fold_mup(sd: dict[str, torch.Tensor], model: GPTModel) -> dict[str, torch.Tensor]:
    """A µP model's weights as a standard GPT-2 computes the same logits with: GPT-2 scales
    attention by 1/sqrt(d_head) where µP scales by 1/d_head, so the queries (their rows of qkv,
    and bias) are divided by sqrt(d_head); the readout multiplier 1/width_mult goes into the head
    (µP runs are untied, so the embedding is not touched)."""
    cfg = model.cfg
    d, head_dim = cfg.embedding_dim, cfg.embedding_dim // cfg.num_heads
    out = dict(sd)
    for i in range(cfg.num_layers):
        for name in ("attn.qkv.weight", "attn.qkv.bias"):
            key = f"trf_blocks.{i}.{name}"
            if key in out:
                tensor = out[key].clone()
                tensor[:d] /= math.sqrt(head_dim)
                out[key] = tensor
    out["out_head.weight"] = out["out_head.weight"] / model.width_mult
    return out


def from_gpt2_state_dict(weights: dict[str, torch.Tensor], model: GPTModel) -> dict[str, torch.Tensor]:
    """The inverse: a GPT-2 state dict as `model`'s (raygpt names, padded rows, no qkv bias when
    the model has none, which needs GPT-2's to be zero)."""
    cfg = model.cfg
    weights = {k.removeprefix("model."): v for k, v in weights.items()}
    if "transformer.wte.weight" not in weights and "wte.weight" in weights:  # GPT2Model without the head
        weights = {f"transformer.{k}": v for k, v in weights.items()}
    out: dict[str, torch.Tensor] = {}
    for name, gpt2 in TOP_NAMES.items():
        if name == "out_head.weight" and gpt2 not in weights:
            gpt2 = "transformer.wte.weight"  # tied in the file: the head is the embedding
        out[name] = weights[gpt2]
    for i in range(cfg.num_layers):
        for name, (gpt2, transposed) in BLOCK_NAMES.items():
            tensor = weights[f"transformer.h.{i}.{gpt2}"]
            if name == "attn.qkv.bias" and not cfg.qkv_bias:
                if tensor.abs().max() > 0:
                    raise UserError("the GPT-2 weights have a non-zero qkv bias: set model.qkv_bias: true")
                continue
            out[f"trf_blocks.{i}.{name}"] = tensor.t().contiguous() if transposed else tensor
    return {k: v.to(torch.float32) for k, v in out.items()}


def gpt2_config(model: GPTModel) -> dict[str, Any]:
    cfg = model.cfg
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocabulary_size, "n_positions": cfg.context_len, "n_ctx": cfg.context_len,
        "n_embd": cfg.embedding_dim, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": EOT_ID, "eos_token_id": EOT_ID,
        "torch_dtype": "float32", "dtype": "float32",
    }


def model_shape_from_gpt2_config(config: dict[str, Any]) -> dict[str, Any]:
    """raygpt's model keys from a GPT-2 config.json."""
    try:
        return {"embedding_dim": config["n_embd"], "num_layers": config["n_layer"], "num_heads": config["n_head"],
                "context_len": config["n_positions"], "vocabulary_size": config["vocab_size"],
                "tie_embeddings": bool(config.get("tie_word_embeddings", True))}
    except KeyError as exc:
        raise UserError(f"not a GPT-2 config.json: no {exc.args[0]!r}") from None


# ----------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 byte values (vocab.json / merges.txt spell tokens
    with them)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """The two parts whose merge made `token`: byte-pair merging with only lower ranks."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def write_tokenizer(out: Path, model_max_length: int) -> None:
    """vocab.json, merges.txt and the configs of GPT-2's tokenizer, from the vendored ranks."""
    ranks = _load_ranks()
    spell = _bytes_to_unicode()
    text = {rank: "".join(spell[b] for b in token) for token, rank in ranks.items()}
    vocab = {text[r]: r for r in sorted(text)} | {EOT_TOKEN: EOT_ID}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _bpe_split(ranks, token, rank)
            merges.append(f"{''.join(spell[b] for b in left)} {''.join(spell[b] for b in right)}")
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
        "add_bos_token": False, **special}))


# ----------------------------------------------------------------------------- export / import


# Every file an export writes: the only files it replaces in an --out folder, and only in one that
# holds its marker (an earlier export), never in a user's folder of files of the same names.
EXPORT_MARKER = ".raygpt-export"
EXPORT_FILES = (WEIGHTS, CONFIG, "generation_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                "tokenizer_config.json", EXPORT_MARKER)


def check_export_folder(out: str | Path) -> Path:
    """--out as export may write it (`storage.check_output_folder`): new, empty, or an earlier export."""
    return storage.check_output_folder(out, EXPORT_FILES, EXPORT_MARKER, "raygpt's export")


def export(model: GPTModel, out: str | Path) -> Path:
    """Write `model` as a Hugging Face GPT-2 folder at `out` (`check_export_folder`): the files are
    written into a temporary folder beside it and moved in one by one, each replacing the link
    and not what a symlink of that name pointed to."""
    st = _safetensors()
    out = check_export_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the folder ({exc.strerror})") from None
    try:
        st.save_file(to_gpt2_state_dict(model), str(staging / WEIGHTS), metadata={"format": "pt"})
        (staging / CONFIG).write_text(json.dumps(gpt2_config(model), indent=2))
        (staging / "generation_config.json").write_text(json.dumps({"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}))
        write_tokenizer(staging, model.cfg.context_len)
        (staging / EXPORT_MARKER).write_text(json.dumps({"written_by": "raygpt export", "files": EXPORT_FILES[:-1]}))
        for name in EXPORT_FILES:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def read_gpt2_config(folder: str | Path) -> dict[str, Any]:
    """The config.json of a local Hugging Face GPT-2 folder (one line when it is not one)."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise UserError(f"model.init_from {folder}: no {CONFIG} there (a local Hugging Face GPT-2 folder is expected)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"model.init_from {folder}: {CONFIG} does not read ({exc})") from None
    if not isinstance(config, dict) or config.get("model_type") != "gpt2":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise UserError(f"model.init_from {folder}: model_type {kind!r} in {CONFIG}, expected 'gpt2'")
    return config


def read_gpt2_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, weights) of a local Hugging Face GPT-2 folder (model.safetensors, else
    pytorch_model.bin loaded with weights_only)."""
    folder = Path(folder)
    config = read_gpt2_config(folder)
    if (folder / WEIGHTS).is_file():
        weights = _safetensors().load_file(str(folder / WEIGHTS))
    elif (folder / "pytorch_model.bin").is_file():
        weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"model.init_from {folder}: no {WEIGHTS} or pytorch_model.bin there")
    return config, weights


def check_shape(config: dict[str, Any], model_cfg: Any, folder: str) -> None:
    """The run's model section must describe the folder's model (one line naming what differs)."""
    shape = model_shape_from_gpt2_config(config)
    diffs = [f"{k} {getattr(model_cfg, k)} vs {v}" for k, v in shape.items() if getattr(model_cfg, k) != v]
    if diffs:
        raise UserError(f"model.init_from {folder} is another shape than the model section (config vs folder: "
                        f"{', '.join(diffs)}); set the model section to the folder's")


def check_init_from(model_cfg: Any) -> None:
    """Before launch: model.init_from is a GPT-2 folder of the model section's shape (reads only
    its config.json), for a run of the standard parametrization (GPT-2's)."""
    if model_cfg.parametrization != "standard":
        raise UserError("model.init_from loads GPT-2's weights, trained in the standard parametrization; "
                        "a model.parametrization mup run starts from its own initialisation")
    check_shape(read_gpt2_config(model_cfg.init_from), model_cfg, model_cfg.init_from)


def load_into(model: GPTModel, folder: str | Path) -> None:
    """Load a Hugging Face GPT-2 folder's weights into `model` (its shape checked first)."""
    config, weights = read_gpt2_folder(folder)
    check_shape(config, model.cfg, str(folder))
    try:
        model.load_state_dict(from_gpt2_state_dict(weights, model))
    except KeyError as exc:
        raise UserError(f"model.init_from {folder}: the weights have no {exc.args[0]}") from None


def export_checkpoint(checkpoint: str, out: str) -> Path:
    """`raygpt export`: the newest loadable checkpoint of a run folder (or the checkpoint given,
    local or on storage) as a Hugging Face GPT-2 folder."""
    from raygpt.generate import load_model

    check_export_folder(out)  # before the checkpoint is read
    model, _ = load_model(checkpoint)
    return export(model.float(), out)
