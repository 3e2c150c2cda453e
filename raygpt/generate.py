"""Sample text from any checkpoint (a local folder, a run folder, or a storage URI)."""

from __future__ import annotations

import math
import sys
from dataclasses import fields
from typing import Any

import torch

from raygpt import checkpoint as ckpt
from raygpt import runs, storage
from raygpt.errors import UserError
from raygpt.model import GPTConfig, GPTModel, padded_vocab_size
from raygpt.storage import STATE_FILE
from raygpt.tokenizer import EOT_ID, gpt2_encoding


def resolve_checkpoint(path: str) -> list[str]:
    """The checkpoint folder given, or a run folder's complete checkpoints, newest first."""
    target = storage.resolve_storage(path)
    if storage.exists(storage.join(target, STATE_FILE)):
        return [target]
    found = list(reversed(runs.complete_checkpoints(target)))
    if found:
        return found
    raise UserError(f"no checkpoint at {path}: give a checkpoint_* folder or a run folder holding one")


def check_config_matches_weights(model_cfg: dict[str, Any], weights: dict[str, torch.Tensor], where: str) -> None:
    """state.json's model section must describe the weights beside it: a damaged or edited one
    (a context_len of 1e9 would allocate its positions before failing) is refused first."""
    for key, value in weights.items():  # a sharded checkpoint's model state (a whole one's is checked on load)
        if not torch.is_tensor(value):
            raise UserError(f"checkpoint {where} is damaged: its model weights hold {key!r}, a "
                            f"{type(value).__name__}, not a tensor")
    rows, dim = weights.get("tok_emb.weight", torch.empty(0, 0)).shape
    shapes = {"embedding_dim": dim, "context_len": weights.get("pos_emb.weight", torch.empty(0, 0)).shape[0],
              "num_layers": len({k.split(".")[1] for k in weights if k.startswith("trf_blocks.")})}
    wrong = [f"{k} {model_cfg.get(k)!r} vs {v}" for k, v in shapes.items()
             if model_cfg.get(k) != v or type(model_cfg.get(k)) is not int]  # 16.0 is no layer width
    vocab, pad = model_cfg.get("vocabulary_size"), model_cfg.get("pad_vocab_multiple", 1)
    if not (isinstance(vocab, int) and isinstance(pad, int) and pad >= 1 and rows == padded_vocab_size(vocab, pad)):
        wrong.append(f"vocabulary_size {vocab!r} (padded to a multiple of {pad!r}) vs {rows} rows")
    heads = model_cfg.get("num_heads")
    if not isinstance(heads, int) or heads < 1 or shapes["embedding_dim"] % heads:
        wrong.append(f"num_heads {heads!r} does not divide embedding_dim {shapes['embedding_dim']}")
    wrong += [f"{k} {model_cfg[k]!r} is not true or false" for k in ("qkv_bias", "tie_embeddings")
              if not isinstance(model_cfg.get(k, False), bool)]
    # dropout leaves no trace in the weights, so no value can be caught disagreeing with them; and
    # the model samples in eval mode, where dropout does nothing: any probability gives the same
    # samples. It is kept, not ignored (export writes it into config.json for fine-tuning), so only
    # a value that is no probability is refused (nn.Dropout would raise on it with a traceback).
    dropout = model_cfg.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        wrong.append(f"dropout {dropout!r} is not a probability in [0, 1)")
    _refuse(wrong, where)


def check_weights_fit(model_cfg: dict[str, Any], model: GPTModel, weights: dict[str, torch.Tensor],
                      where: str) -> None:
    """The weights hold exactly the tensors of the model state.json describes, in its shapes:
    what strict loading would refuse with a traceback (a qkv bias said to be there and not, or
    the other way round; a missing or foreign tensor), and what it would take silently: a tied
    model's head and embedding are one tensor, so weights whose two differ would lose one."""
    expected = model.state_dict()
    missing, extra = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    wrong = []
    for keys, says in ((missing, "has no"), (extra, "holds")):
        biases = [k for k in keys if k.endswith(".attn.qkv.bias")]  # one per layer: named once
        if biases:
            more = f" and {len(biases) - 1} more layers" if len(biases) > 1 else ""
            wrong.append(f"qkv_bias {model_cfg.get('qkv_bias', False)!r}, but model.pt {says} {biases[0]}{more}")
        wrong += [f"model.pt {says} {k}" for k in keys if k not in biases]
    for key in sorted(expected.keys() & weights.keys()):
        if not weights[key].is_floating_point():
            wrong.append(f"{key} is a {weights[key].dtype} tensor, not floating point")
        elif weights[key].shape != expected[key].shape:
            wrong.append(f"{key} is {tuple(weights[key].shape)} in model.pt, {tuple(expected[key].shape)} "
                         "for the config")
    head, emb = weights.get("out_head.weight"), weights.get("tok_emb.weight")
    if (model.cfg.tie_embeddings and not wrong and head is not None and emb is not None
            and not torch.equal(head, emb)):
        wrong.append("tie_embeddings True, but model.pt's out_head.weight differs from its tok_emb.weight")
    # tie_embeddings false over equal head and embedding (a tied model's weights) is accepted: the
    # untied model computes the same function, and training a tied model on untied is legitimate.
    _refuse(wrong[:5] + ([f"{len(wrong) - 5} more"] if len(wrong) > 5 else []), where)


def _refuse(wrong: list[str], where: str) -> None:
    if wrong:
        raise UserError(f"checkpoint {where}: state.json's model config does not match model.pt "
                        f"(config vs weights: {', '.join(wrong)})")


def load_model(path: str) -> tuple[GPTModel, dict]:
    """The model of a checkpoint (in a run folder, the newest one that loads), in eval mode,
    and the checkpoint's state (with its config)."""
    candidates = resolve_checkpoint(path)
    if len(candidates) == 1:  # the folder asked for (or a run's only one): its own error, in one line
        uri = candidates[0]
        with storage.temporary_dir() as tmp:
            loaded = ckpt.load_checkpoint(storage.download(uri, tmp), with_optimizer=False)
    else:  # a run folder: the newest that loads, as training restores
        loaded, uri = ckpt.load_newest_valid(candidates, lambda line: print(line, file=sys.stderr),
                                                 with_optimizer=False)
    model_cfg = loaded["state"]["config"]["model"]
    check_config_matches_weights(model_cfg, loaded["model"], uri)
    model = GPTModel(**{f.name: model_cfg[f.name] for f in fields(GPTConfig) if f.name in model_cfg})
    check_weights_fit(model_cfg, model, loaded["model"], uri)
    model.load_state_dict(loaded["model"])
    return model.eval(), loaded["state"]


MIN_TEMPERATURE = 1e-4  # logits / temperature stays finite in float32 for logits up to ~3e34
MAX_SEED = 2**64 - 1  # torch.Generator's seeds: 64 bits


def check_sampling_options(max_new_tokens: int, temperature: float, top_k: int | None, seed: int | None) -> None:
    """Options that sample: a temperature below MIN_TEMPERATURE made logits / temperature
    infinite (NaN probabilities), and NaN was silently greedy; below it, sampling is greedy
    anyway. Infinite would be uniform noise with no model in it."""
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if top_k is not None and top_k <= 0:
        raise UserError(f"--top-k must be > 0, got {top_k}")
    if temperature != 0 and not (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE):
        raise UserError(f"--temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, "
                        f"got {temperature}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be an integer from 0 to 2**64 - 1 ({MAX_SEED}), got {seed}")


def generate_text(path: str, prompt: str, max_new_tokens: int = 50, temperature: float = 0.0,
                  top_k: int | None = None, seed: int | None = None) -> str:
    check_sampling_options(max_new_tokens, temperature, top_k, seed)
    model, _ = load_model(path)
    enc = gpt2_encoding()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT_ID]
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    out = model.generate(torch.tensor([ids]), max_new_tokens, temperature=temperature, top_k=top_k,
                         eos_id=EOT_ID, generator=generator)
    return enc.decode(out[0].tolist())
