"""The memory plan of a run: what one worker's device holds, estimated from the config alone,
checked before launch against the GPU the run is sized for (`run.accelerator_type`).

Per worker (DDP: every worker holds all of it):
  weights            4 bytes per parameter (fp32 master weights, also under bf16 autocast)
  gradients          4 bytes per parameter
  optimizer state    8 bytes per parameter (AdamW's two moments)
  activations        what backward keeps for one micro-batch of `context_len` tokens: per block
                     17 values per token and embedding dimension (LayerNorm inputs and outputs,
                     q/k/v, the attention output, the MLP's 4x-wide input and GELU output, the
                     residual stream; flash / memory-efficient attention keeps no T x T scores)
                     at 2 bytes (bf16) or 4 (fp32), plus dropout masks (1 byte) when dropout is on;
                     with activation checkpointing only each block's input, plus one block's full
                     set while it is recomputed. The output head adds the logits, their
                     log-softmax and, at the peak in backward, the logits' gradient, over the padded
                     vocabulary (2 + 4 + 4 bytes per token under bf16, 4 + 4 + 4 in fp32).
The estimate leaves out the CUDA context and the allocator's slack (~0.5-1 GB on a GPU), so a plan
is refused only past the device's memory and warned about within 10% of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from raygpt.config import GPU_MEMORY_GB, Config
from raygpt.errors import UserError
from raygpt.model import padded_vocab_size

GB = 1e9
BLOCK_VALUES_PER_TOKEN = 17  # per embedding dimension, kept by one block for backward


@dataclass
class MemoryPlan:
    parameters: int
    weights: float  # bytes
    gradients: float
    optimizer: float
    activations: float
    device: str | None  # the GPU it is checked against, if known
    device_bytes: float | None

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def terms(self) -> dict[str, float]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer state": self.optimizer,
                "activations": self.activations}

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GB:.2f}" for name, value in self.terms().items())
        against = f" of the {self.device}'s {self.device_bytes / GB:.0f} GB" if self.device_bytes else ""
        return f"memory per worker: {self.total / GB:.2f} GB{against} ({parts} GB; {self.parameters:,} parameters)"


def count_parameters(cfg: Config) -> int:
    """The model's parameters, padded vocabulary included, by formula (no model is built, so any
    config, however large, is counted at once): embeddings, per block two LayerNorms, q/k/v and
    the output projection (12 d^2 with the MLP's two 4d matrices) and their biases, the final
    LayerNorm, and the head unless tied to the token embedding."""
    m = cfg.model
    d, vocab = m.embedding_dim, padded_vocab_size(m.vocabulary_size, m.pad_vocab_multiple)
    block = 12 * d * d + 10 * d + (3 * d if m.qkv_bias else 0)
    head = 0 if m.tie_embeddings else vocab * d
    return vocab * d + m.context_len * d + m.num_layers * block + 2 * d + head


def activation_bytes(cfg: Config, micro_batch: int, precision: str) -> float:
    m = cfg.model
    tokens = micro_batch * m.context_len
    width = 2 if precision == "bf16" else 4
    per_block = tokens * m.embedding_dim * (BLOCK_VALUES_PER_TOKEN * width + (2 if m.dropout > 0 else 0))
    kept_blocks = (m.num_layers * tokens * m.embedding_dim * width + per_block if m.activation_checkpointing
                   else m.num_layers * per_block)
    padded = padded_vocab_size(m.vocabulary_size, m.pad_vocab_multiple)
    # The logits, their log-softmax (fp32 either way) and, at the peak in backward, their gradient.
    head = tokens * padded * (2 + 4 + 4 if precision == "bf16" else 4 + 4 + 4)
    embeddings = 2 * tokens * m.embedding_dim * width
    return kept_blocks + head + embeddings


def memory_plan(cfg: Config) -> MemoryPlan:
    t, r = cfg.train, cfg.run
    micro_batch = max(1, t.batch_size // (r.num_workers * t.grad_accum_steps))
    # auto resolves to bf16 on the GPUs the table knows (compute capability 8+), fp32 elsewhere.
    precision = t.precision if t.precision != "auto" else ("bf16" if r.use_gpu and r.accelerator_type not in
                                                           ("T4", "V100") else "fp32")
    n = count_parameters(cfg)
    device = r.accelerator_type if r.use_gpu else None
    return MemoryPlan(n, 4.0 * n, 4.0 * n, 8.0 * n, activation_bytes(cfg, micro_batch, precision), device,
                      GPU_MEMORY_GB[device] * GB if device in GPU_MEMORY_GB else None)


def check_memory_plan(cfg: Config, log=print) -> MemoryPlan:
    """Print the plan; refuse in one line a plan larger than the device, naming the biggest term
    and what would fit."""
    plan = memory_plan(cfg)
    log(plan.describe())
    if plan.device_bytes is None:
        return plan
    if plan.total > plan.device_bytes:
        where = f"the {plan.device}'s {plan.device_bytes / GB:.0f} GB"
        state = plan.weights + plan.gradients + plan.optimizer
        if state > plan.device_bytes:
            raise UserError(f"the model does not fit: its weights, gradients and AdamW state alone take "
                            f"{state / GB:.1f} GB per worker (optimizer state {plan.optimizer / GB:.1f} GB the "
                            f"biggest; {plan.total / GB:.1f} GB with activations) vs {where}; it needs its state "
                            f"sharded over workers (FSDP: not yet in raygpt), or a smaller model")
        fix = ("set model.activation_checkpointing=true, or a smaller micro-batch (more train.grad_accum_steps)"
               if not cfg.model.activation_checkpointing else
               "a smaller micro-batch (more train.grad_accum_steps, or more run.num_workers)")
        raise UserError(f"the model does not fit: {plan.total / GB:.1f} GB per worker vs {where}, "
                        f"activations {plan.activations / GB:.1f} GB the biggest term; {fix}")
    if plan.total > 0.9 * plan.device_bytes:
        log(f"warning: the plan uses {plan.total / plan.device_bytes:.0%} of the {plan.device}'s memory; "
            "the CUDA context and allocator need some too")
    return plan
