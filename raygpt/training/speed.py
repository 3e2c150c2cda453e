"""The speed options of the loop, resolved per device: mixed precision, TF32, fused AdamW, compile.

Only torch: the loop and the GPU check under bench/ share these, so what the benchmark measures is
what training runs. "auto" settings pick what is fast and safe on the device at hand.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def resolve_precision(setting: str, device: torch.device) -> str:
    """'auto' is bf16 on a GPU whose tensor cores run it (compute capability 8.0 and up: A100,
    A10G, L4, H100, ...), else fp32. Older GPUs (V100, T4) only emulate bf16, which torch's
    `is_bf16_supported` counts, and there it is slower than fp32 with no flash attention. On CPU
    bf16 is an explicit choice (faster matmuls on recent cores, looser numerics)."""
    if setting != "auto":
        return setting
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward pass and loss (weights, grads and optimizer stay fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_tf32(device: torch.device, enabled: bool) -> None:
    """fp32 matmuls on tensor cores (10-bit mantissa inputs, fp32 accumulate) on GPUs."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def fused_adamw(setting: bool | None, device: torch.device) -> bool:
    """None (auto): the fused kernel on GPUs and on CPU, where torch has one and is the faster
    (README "Speed" has the figures); other devices keep the foreach implementation."""
    return device.type in ("cuda", "cpu") if setting is None else setting


def adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float,
          fused: bool) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **({"fused": True} if fused else {}))


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """torch.compile the model (checkpoints strip its `_orig_mod.` prefix, so compiled and plain
    runs load each other's checkpoints)."""
    return torch.compile(model) if enabled else model
