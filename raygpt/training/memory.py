"""The memory plan of a run: what one worker's device holds, estimated from the config alone,
checked before launch against the GPU the run is sized for (`run.accelerator_type`), and on each
worker against the memory its GPU has free (`check_device_memory`).

Per worker, under run.strategy=ddp every worker holds all of the first three terms; under fsdp
(FSDP2) each holds 1/num_workers of them (its shard):
  weights            4 bytes per parameter (fp32 master weights, also under bf16 autocast)
  gradients          4 bytes per parameter
  optimizer state    8 bytes per parameter (AdamW's two moments)
  all-gathered parameters (fsdp only)
                     the parameters that are whole at once: the root's (token and position
                     embeddings over the padded vocabulary, final LayerNorm, the head unless tied),
                     which stay gathered from the start of forward to the end of backward, and two
                     blocks' (the one computing and the one FSDP2 prefetches), plus as much again
                     for their gradients before the reduce-scatter; at 4 bytes (fp32), or 2 on bf16
                     runs, where FSDP2's mixed precision gathers in bf16
  accumulated gradients (fsdp with train.grad_accum_steps > 1)
                     4 bytes per parameter of the whole model: the reduce-scatter waits for the
                     last micro-batch (`set_requires_gradient_sync(False)` before it, the counterpart
                     of DDP's no_sync), and until then FSDP2 keeps every parameter's gradient
                     unsharded, in fp32 (its reduce dtype); DDP accumulates in the gradients above
  activations        what backward keeps for one micro-batch of `context_len` tokens: per block
                     17 values per token and embedding dimension (LayerNorm inputs and outputs,
                     q/k/v, the attention output, the MLP's 4x-wide input and GELU output, the
                     residual stream; flash / memory-efficient attention keeps no T x T scores)
                     at 2 bytes (bf16) or 4 (fp32), plus dropout masks (1 byte) when dropout is on;
                     with activation checkpointing only each block's input, plus one block's full
                     set while it is recomputed. The output head adds the logits, their
                     log-softmax and, at the peak in backward, the logits' gradient, over the padded
                     vocabulary (2 + 4 + 4 bytes per token under bf16, 4 + 4 + 4 in fp32). The same
                     under either strategy.
The estimate leaves out the CUDA context, the allocator's slack and NCCL's buffers (~0.5-1 GB on a
GPU), so a plan is refused only past the device's memory and warned about within 10% of it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from raygpt.config import GPU_MEMORY_GB, Config
from raygpt.errors import UserError
from raygpt.model import padded_vocab_size

if TYPE_CHECKING:
    import torch

GB = 1e9
BLOCK_VALUES_PER_TOKEN = 17  # per embedding dimension, kept by one block for backward
GATHERED_BLOCKS = 2  # FSDP2 gathers the next block while the current one computes
FSDP_TERMS = ("all-gathered parameters", "accumulated gradients")  # shown only when not 0
MAX_SUGGESTED_WORKERS = 64  # how far the refusal looks for a worker count that fits


@dataclass
class MemoryPlan:
    parameters: int
    weights: float  # bytes
    gradients: float
    optimizer: float
    activations: float
    device: str | None  # the GPU it is checked against, if known
    device_bytes: float | None
    gathered: float = 0.0  # fsdp: the parameters (and their gradients) whole at once; 0 under ddp
    accumulated: float = 0.0  # fsdp with accumulation: whole fp32 gradients between micro-batches
    strategy: str = "ddp"
    num_workers: int = 1

    @property
    def total(self) -> float:
        return sum(self.terms().values())

    def terms(self) -> dict[str, float]:
        terms = {"weights": self.weights, "gradients": self.gradients, "optimizer state": self.optimizer,
                 "all-gathered parameters": self.gathered, "accumulated gradients": self.accumulated,
                 "activations": self.activations}
        return {name: value for name, value in terms.items() if value or name not in FSDP_TERMS}

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GB:.2f}" for name, value in self.terms().items())
        against = f" of the {self.device}'s {self.device_bytes / GB:.0f} GB" if self.device_bytes else ""
        sharded = f", sharded over {_workers(self.num_workers)} (fsdp)" if self.strategy == "fsdp" else ""
        return (f"memory per worker: {self.total / GB:.2f} GB{against}{sharded} ({parts} GB; "
                f"{self.parameters:,} parameters)")

    def biggest(self) -> tuple[str, float]:
        return max(self.terms().items(), key=lambda item: item[1])


def block_parameters(cfg: Config) -> int:
    """One transformer block: two LayerNorms, q/k/v and the output projection (4 d^2), the MLP's
    two 4d matrices (8 d^2), and their biases."""
    m = cfg.model
    d = m.embedding_dim
    return 12 * d * d + 10 * d + (3 * d if m.qkv_bias else 0)


def root_parameters(cfg: Config) -> int:
    """What is not in a block: token and position embeddings, the final LayerNorm and the head
    unless tied to the token embedding (FSDP2's root module)."""
    m = cfg.model
    d, vocab = m.embedding_dim, padded_vocab_size(m.vocabulary_size, m.pad_vocab_multiple)
    head = 0 if m.tie_embeddings else vocab * d
    return vocab * d + m.context_len * d + 2 * d + head


def count_parameters(cfg: Config) -> int:
    """The model's parameters, padded vocabulary included, by formula (no model is built, so any
    config, however large, is counted at once)."""
    return root_parameters(cfg) + cfg.model.num_layers * block_parameters(cfg)


def resolve_precision(cfg: Config) -> str:
    """train.precision as the plan sees it: auto resolves to bf16 on the GPUs the table knows
    (compute capability 8+), fp32 elsewhere (what raygpt.training.speed picks on the device)."""
    t, r = cfg.train, cfg.run
    if t.precision != "auto":
        return t.precision
    return "bf16" if r.use_gpu and r.accelerator_type not in ("T4", "V100") else "fp32"


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


def gathered_bytes(cfg: Config, precision: str) -> float:
    """fsdp: the root's parameters and two blocks' whole at once, and their gradients before the
    reduce-scatter, at the width FSDP2 gathers in."""
    width = 2 if precision == "bf16" else 4
    whole = root_parameters(cfg) + min(GATHERED_BLOCKS, cfg.model.num_layers) * block_parameters(cfg)
    return 2.0 * whole * width


def memory_plan(cfg: Config) -> MemoryPlan:
    t, r = cfg.train, cfg.run
    micro_batch = max(1, t.batch_size // (r.num_workers * t.grad_accum_steps))
    precision = resolve_precision(cfg)
    n = count_parameters(cfg)
    fsdp = r.strategy == "fsdp"
    shards = r.num_workers if fsdp else 1
    device = r.accelerator_type if r.use_gpu else None
    return MemoryPlan(n, 4.0 * n / shards, 4.0 * n / shards, 8.0 * n / shards,
                      activation_bytes(cfg, micro_batch, precision), device,
                      GPU_MEMORY_GB[device] * GB if device in GPU_MEMORY_GB else None,
                      gathered=gathered_bytes(cfg, precision) if fsdp else 0.0,
                      accumulated=4.0 * n if fsdp and t.grad_accum_steps > 1 else 0.0, strategy=r.strategy,
                      num_workers=r.num_workers)


def _variant(cfg: Config, *, workers: int, checkpointing: bool) -> Config:
    changed = copy.deepcopy(cfg)
    changed.run.strategy = "fsdp"
    changed.run.num_workers = workers
    changed.model.activation_checkpointing = checkpointing
    return changed


def fsdp_that_fits(cfg: Config, budget: float) -> tuple[Config, MemoryPlan] | None:
    """The first fsdp variant of `cfg` whose plan fits in `budget` bytes: at its own worker count,
    then at each larger one up to MAX_SUGGESTED_WORKERS (the global batch kept, so the micro-batch
    shrinks), each without and then with activation checkpointing."""
    for workers in range(cfg.run.num_workers, max(cfg.run.num_workers, MAX_SUGGESTED_WORKERS) + 1):
        for checkpointing in sorted({cfg.model.activation_checkpointing, True}):
            changed = _variant(cfg, workers=workers, checkpointing=checkpointing)
            plan = memory_plan(changed)
            if plan.total <= budget:
                return changed, plan
    return None


def _fsdp_fix(cfg: Config, budget: float) -> str:
    """The fsdp settings under which the run fits in `budget` bytes per worker, as one clause."""
    found = fsdp_that_fits(cfg, budget)
    if found is None:
        widest = _variant(cfg, workers=max(cfg.run.num_workers, MAX_SUGGESTED_WORKERS), checkpointing=True)
        return (f"even fsdp over {widest.run.num_workers} workers with activation checkpointing needs "
                f"{memory_plan(widest).total / GB:.1f} GB per worker: a smaller micro-batch (more "
                f"train.grad_accum_steps) or a smaller model")
    changed, plan = found
    sets = [f"run.{key}={value}" for key, value in (("strategy", "fsdp"), ("num_workers", changed.run.num_workers))
            if getattr(cfg.run, key) != value]
    if changed.model.activation_checkpointing and not cfg.model.activation_checkpointing:
        sets.append("model.activation_checkpointing=true")
    batch = ""
    if cfg.train.batch_size % (changed.run.num_workers * cfg.train.grad_accum_steps):
        batch = f"; train.batch_size a multiple of {changed.run.num_workers * cfg.train.grad_accum_steps}"
    return (f"set {' and '.join(sets)} (fsdp over {changed.run.num_workers} workers: {plan.total / GB:.1f} GB "
            f"per worker{batch})")


def largest_micro_batch(cfg: Config, budget: float) -> int:
    """The most sequences per worker per forward pass whose plan fits in `budget` bytes (0: not
    even one); the activations grow linearly with the micro-batch, the rest does not."""
    plan = memory_plan(cfg)
    per_sequence = activation_bytes(cfg, 1, resolve_precision(cfg))
    return max(0, int((budget - (plan.total - plan.activations)) // per_sequence))


def _activations_fix(cfg: Config, budget: float) -> str:
    t, r = cfg.train, cfg.run
    micro_batch = max(1, t.batch_size // (r.num_workers * t.grad_accum_steps))
    fits = largest_micro_batch(cfg, budget)
    room = f"; at most {fits} sequences per worker fit, not {micro_batch}" if fits else ""
    if not cfg.model.activation_checkpointing:
        return f"set model.activation_checkpointing=true, or a smaller micro-batch (more train.grad_accum_steps{room})"
    return f"a smaller micro-batch (more train.grad_accum_steps, or more run.num_workers{room})"


def _fix(cfg: Config, plan: MemoryPlan, budget: float) -> str:
    """What would fit in `budget` bytes per worker: less activation memory when the activations are
    the biggest term (and, under ddp, the model's state fits), else sharding (fsdp, more workers)."""
    state = plan.weights + plan.gradients + plan.optimizer
    biggest = plan.biggest()[0]
    if biggest == "activations" and (plan.strategy == "fsdp" or state < budget):
        return _activations_fix(cfg, budget)
    if biggest == "accumulated gradients":
        return ("fewer train.grad_accum_steps (1: none kept) with a micro-batch that fits, or more "
                "run.num_workers for the same global batch")
    return _fsdp_fix(cfg, budget)


def _workers(n: int) -> str:
    return f"{n} worker{'s' if n != 1 else ''}"


def check_memory_plan(cfg: Config, log: Callable[[str], object] = print) -> MemoryPlan:
    """Print the plan; refuse in one line a plan larger than the device, naming the biggest term
    and what would fit (under ddp, the fsdp settings that would)."""
    plan = memory_plan(cfg)
    log(plan.describe())
    if plan.device_bytes is None:
        return plan
    if plan.total > plan.device_bytes:
        where = f"the {plan.device}'s {plan.device_bytes / GB:.0f} GB"
        fix = _fix(cfg, plan, plan.device_bytes)
        state = plan.weights + plan.gradients + plan.optimizer
        if plan.strategy == "ddp" and state > plan.device_bytes:
            raise UserError(f"the model does not fit: its weights, gradients and AdamW state alone take "
                            f"{state / GB:.1f} GB per worker (optimizer state {plan.optimizer / GB:.1f} GB the "
                            f"biggest; {plan.total / GB:.1f} GB with activations) vs {where}; {fix}")
        sharded = f" sharded over {_workers(plan.num_workers)} (fsdp)" if plan.strategy == "fsdp" else ""
        name, value = plan.biggest()
        raise UserError(f"the model does not fit: {plan.total / GB:.1f} GB per worker{sharded} vs {where}, "
                        f"{name} {value / GB:.1f} GB the biggest term; {fix}")
    if plan.total > 0.9 * plan.device_bytes:
        log(f"warning: the plan uses {plan.total / plan.device_bytes:.0%} of the {plan.device}'s memory; "
            "the CUDA context and allocator need some too")
    return plan


def check_free_memory(cfg: Config, available: float, total: float, where: str,
                      log: Callable[[str], object] = print) -> MemoryPlan:
    """The decision of `check_device_memory`, from numbers: refuse in one line a plan larger than
    the `available` bytes of the device named `where` (of `total`), warn within 10% of them."""
    plan = memory_plan(cfg)
    if plan.total > available:
        others = total - available
        held = f", {others / GB:.1f} GB in use elsewhere" if others > 1 * GB else ""
        raise UserError(f"the model does not fit on {where}: the plan needs {plan.total / GB:.1f} GB per worker "
                        f"but {available / GB:.1f} GB of its {total / GB:.1f} GB are free{held}; "
                        f"{_fix(cfg, plan, available)}")
    if plan.total > 0.9 * available:
        log(f"warning: the plan ({plan.total / GB:.1f} GB) uses {plan.total / available:.0%} of the "
            f"{available / GB:.1f} GB free on {where}; the CUDA context and allocator need some too")
    return plan


def check_device_memory(cfg: Config, device: torch.device, log: Callable[[str], object] = print) -> None:
    """On a CUDA device, check the plan against the memory free on it now (a GPU smaller than
    run.accelerator_type, or shared with another process, is caught before the first step rather
    than as an out-of-memory error in it). What this process's allocator already holds counts as
    available: the plan includes it (the model may be on the device already). Elsewhere: nothing."""
    if device.type != "cuda":
        return
    import torch

    free, total = torch.cuda.mem_get_info(device)
    where = f"{device} ({torch.cuda.get_device_name(device)})"
    check_free_memory(cfg, free + torch.cuda.memory_reserved(device), total, where, log)
