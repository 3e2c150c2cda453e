"""Sample text from any checkpoint (a local folder, a run folder, or a storage URI)."""

from __future__ import annotations

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
    rows, dim = weights.get("tok_emb.weight", torch.empty(0, 0)).shape
    shapes = {"embedding_dim": dim, "context_len": weights.get("pos_emb.weight", torch.empty(0, 0)).shape[0],
              "num_layers": len({k.split(".")[1] for k in weights if k.startswith("trf_blocks.")})}
    wrong = [f"{k} {model_cfg.get(k)!r} vs {v}" for k, v in shapes.items() if model_cfg.get(k) != v]
    vocab, pad = model_cfg.get("vocabulary_size"), model_cfg.get("pad_vocab_multiple", 1)
    if not (isinstance(vocab, int) and isinstance(pad, int) and pad >= 1 and rows == padded_vocab_size(vocab, pad)):
        wrong.append(f"vocabulary_size {vocab!r} (padded to a multiple of {pad!r}) vs {rows} rows")
    heads = model_cfg.get("num_heads")
    if not isinstance(heads, int) or heads < 1 or shapes["embedding_dim"] % heads:
        wrong.append(f"num_heads {heads!r} does not divide embedding_dim {shapes['embedding_dim']}")
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
    model.load_state_dict(loaded["model"])
    return model.eval(), loaded["state"]


def generate_text(path: str, prompt: str, max_new_tokens: int = 50, temperature: float = 0.0,
                  top_k: int | None = None, seed: int | None = None) -> str:
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k <= 0):
        raise UserError("--max-new-tokens and --temperature must be >= 0, --top-k > 0")
    model, _ = load_model(path)
    enc = gpt2_encoding()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT_ID]
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    out = model.generate(torch.tensor([ids]), max_new_tokens, temperature=temperature, top_k=top_k,
                         eos_id=EOT_ID, generator=generator)
    return enc.decode(out[0].tolist())
