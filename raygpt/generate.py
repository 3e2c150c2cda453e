"""Sample text from any checkpoint (a local folder, a run folder, or a storage URI)."""

from __future__ import annotations

from dataclasses import fields

import torch

from raygpt import checkpoint as ckpt
from raygpt.errors import UserError
from raygpt.model import GPTConfig, GPTModel
from raygpt.tokenizer import EOT_ID, gpt2_encoding


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder as given, or the newest one inside a run folder."""
    target = ckpt.resolve_storage(path)
    if ckpt.exists(ckpt.join(target, "state.json")):
        return target
    found = [c for c in ckpt.list_checkpoints(target) if ckpt.exists(ckpt.join(c, "state.json"))]
    if found:
        return found[-1]
    raise UserError(f"no checkpoint at {path}: give a checkpoint_* folder or a run folder holding one")


def load_model(path: str) -> tuple[GPTModel, dict]:
    """The model of a checkpoint, in eval mode, and the checkpoint's state (with its config)."""
    uri = resolve_checkpoint(path)
    with ckpt.temporary_dir() as tmp:
        loaded = ckpt.load_checkpoint(ckpt.download(uri, tmp), with_optimizer=False)
    model_cfg = loaded["state"]["config"]["model"]
    model = GPTModel(**{f.name: model_cfg[f.name] for f in fields(GPTConfig)})
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
