"""run.strategy fsdp: FSDP2 around the model, and moving state between the two strategies.

Under fsdp each worker holds 1/N of every parameter, gradient and AdamW moment (`fully_shard`
on each transformer block and on the root, which keeps the embeddings, the final LayerNorm and
the head); a block's full weights exist only while it runs. The loop and `train_step` are the
same for both strategies; what differs is here:

- the optimizer is built on the sharded parameters (after `shard_model`);
- gradient accumulation skips the reduce-scatter on all but the last micro-batch
  (`set_requires_gradient_sync`, the counterpart of DDP's `no_sync`);
- the gradient norm is a DTensor; `full_value` reduces it over the shards (the global norm);
- every forward all-gathers weights, so every rank runs the same number of them (evaluation pads
  with throwaway batches, samples are generated on every rank);
- checkpoints are written by every rank (`raygpt.checkpoint.save_sharded`) and read back whole,
  then handed out with torch.distributed.checkpoint.state_dict, so either layout loads into
  either strategy at any worker count.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

from raygpt.model import fit_rows, fit_vocab_rows


def shard_model(model: torch.nn.Module, bf16: bool) -> torch.nn.Module:
    """FSDP2 over the default process group: each block, then the root. With `bf16`, weights are
    gathered and computed in bf16 while gradients are reduced and the optimizer steps in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in model.trf_blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: reduce gradients over the workers only when
    `enabled` (the last micro-batch of a step). DDP's `no_sync`, FSDP2's switch, or nothing."""
    if enabled:
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)
        yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's value over all shards (a plain tensor as it is)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is on any (a collective: every rank calls it at the same point)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------- loading state


def optimizer_state_by_name(state: dict[str, Any], optimizer: torch.optim.Optimizer,
                            model: torch.nn.Module) -> dict[str, Any]:
    """A whole checkpoint's optimizer state (torch's format: parameters by index, in the order of
    the optimizer's groups) keyed by parameter name, as a sharded checkpoint holds it."""
    names = {id(p): name for name, p in getattr(model, "_orig_mod", model).named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {order[i]: value for i, value in state["state"].items()}
    groups = [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]]
    return {"state": by_name, "param_groups": groups}


def _fit_named_rows(optimizer_state: dict[str, Any], shapes: dict[str, torch.Size]) -> dict[str, Any]:
    """Optimizer moments saved with another vocabulary padding: rows cut or zero-filled to fit."""
    out = {}
    for name, values in optimizer_state["state"].items():
        shape = shapes.get(name)
        out[name] = {k: fit_rows(v, shape[0]) if shape is not None and torch.is_tensor(v) and v.dim()
                     and v.shape != shape and v.shape[1:] == shape[1:] else v for k, v in values.items()}
    return {"state": out, "param_groups": optimizer_state["param_groups"]}


def load_whole_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, loaded: dict[str, Any]) -> None:
    """Load a checkpoint read back whole (`raygpt.checkpoint.load_checkpoint`, either layout) into
    a model of either strategy, resharding to the worker count now running; every rank calls it
    with the same checkpoint."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    plain = getattr(model, "_orig_mod", model)
    shapes = {name: p.shape for name, p in plain.named_parameters()}  # global shapes (DTensor or not)
    padded_rows = shapes["tok_emb.weight"][0]
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(plain, fit_vocab_rows(loaded["model"], padded_rows), options=options)
    if optimizer is None or loaded.get("optimizer") is None:
        return
    state = loaded["optimizer"] if loaded.get("sharded") else optimizer_state_by_name(loaded["optimizer"],
                                                                                      optimizer, plain)
    set_optimizer_state_dict(plain, optimizer, _fit_named_rows(state, shapes), options=options)
