"""The GPT model: plain PyTorch, no framework glue (no Ray import here).

Parameter names follow the LLMs-from-scratch GPTModel (`tok_emb`, `pos_emb`, `trf_blocks`, `final_norm`, `out_head`);
attention projects q, k and v with one fused matmul and runs through
`scaled_dot_product_attention` (flash / memory-efficient kernels where the device has them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Architecture presets. gpt2-* are the four GPT-2 sizes; `tiny` is sized for CPUs (the demo job).
PRESETS: dict[str, dict] = {
    "tiny": dict(embedding_dim=128, num_layers=4, num_heads=4, context_len=128),
    "gpt2-small": dict(embedding_dim=768, num_layers=12, num_heads=12, context_len=1024),
    "gpt2-medium": dict(embedding_dim=1024, num_layers=24, num_heads=16, context_len=1024),
    "gpt2-large": dict(embedding_dim=1280, num_layers=36, num_heads=20, context_len=1024),
    "gpt2-xl": dict(embedding_dim=1600, num_layers=48, num_heads=25, context_len=1024),
}


def padded_vocab_size(vocabulary_size: int, multiple: int) -> int:
    return -(-vocabulary_size // multiple) * multiple


VOCAB_ROWS = ("tok_emb.weight", "out_head.weight")


def fit_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with its first dimension cut or zero-padded to `rows`."""
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))])


def fit_vocab_rows(state_dict: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """A state dict whose vocabulary rows match a model padded to `rows` (padding rows are never
    looked up and their logits are cut off, so the model computes the same function)."""
    return {k: fit_rows(v, rows) if k in VOCAB_ROWS and v.shape[0] != rows else v for k, v in state_dict.items()}


@dataclass
class GPTConfig:
    """The recipe's model parameters, plus weight tying (off by default: the recipe has an untied head)."""

    embedding_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    context_len: int = 1024
    vocabulary_size: int = 50257
    dropout: float = 0.1
    qkv_bias: bool = False
    tie_embeddings: bool = False
    # Rows of the embedding and output head rounded up to a multiple of this (64: 50,257 -> 50,304)
    # for faster matmuls; logits and loss stay over the real vocabulary. 1: no padding.
    pad_vocab_multiple: int = 1
    # standard: GPT-2's. mup: the Maximal Update Parametrization (Tensor Programs V), relative to a
    # model of width mup_base_width, so the best learning rate found at a small width holds at a
    # large one: attention logits scaled by 1/d_head (not 1/sqrt(d_head)), the output logits
    # divided by width_mult = embedding_dim / mup_base_width, hidden matrices initialised with std
    # 0.02 / sqrt(width_mult) and stepped at lr / width_mult (`mup_lr_scale`).
    parametrization: str = "standard"
    mup_base_width: int = 128  # the tiny preset's width


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.embedding_dim % cfg.num_heads:
            raise ValueError(
                f"embedding_dim {cfg.embedding_dim} is not divisible by num_heads {cfg.num_heads}"
            )
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout
        # µP: q.k / d_head (keys and queries grow correlated with width); None: SDPA's 1/sqrt(d_head).
        self.scale = (cfg.num_heads / cfg.embedding_dim) if cfg.parametrization == "mup" else None
        self.qkv = nn.Linear(cfg.embedding_dim, 3 * cfg.embedding_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.embedding_dim, cfg.embedding_dim)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (b, t, d) -> (b, heads, t, head_dim)
        q, k, v = (z.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True, scale=self.scale
        )
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.resid_dropout(self.out_proj(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.embedding_dim, 4 * cfg.embedding_dim)
        self.proj = nn.Linear(4 * cfg.embedding_dim, cfg.embedding_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh approximation: the GELU GPT-2 (and the recipe) uses.
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + ff(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embedding_dim)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embedding_dim)
        self.ff = FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


def mup_hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weights whose both dimensions grow with the width (attention and MLP matrices): µP
    scales their init and their AdamW learning rate; embeddings, the readout, biases and LayerNorms
    keep the base ones."""
    return [m.weight for block in model.trf_blocks for m in (block.attn.qkv, block.attn.out_proj, block.ff.fc,
                                                            block.ff.proj)]


def mup_lr_scale(model: nn.Module) -> dict[int, float]:
    """id(parameter) -> its learning-rate multiplier under µP (1 / width_mult for hidden
    matrices); empty under the standard parametrization."""
    width_mult = getattr(model, "width_mult", 1.0)
    return {} if width_mult == 1.0 else {id(w): 1.0 / width_mult for w in mup_hidden_matrices(model)}


class GPTModel(nn.Module):
    def __init__(
        self,
        embedding_dim: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        context_len: int = 1024,
        vocabulary_size: int = 50257,
        dropout: float = 0.1,
        qkv_bias: bool = False,
        tie_embeddings: bool = False,
        pad_vocab_multiple: int = 1,
        parametrization: str = "standard",
        mup_base_width: int = 128,
    ):
        super().__init__()
        self.activation_checkpointing = False  # a training setting, not part of the shape
        cfg = GPTConfig(
            embedding_dim, num_layers, num_heads, context_len, vocabulary_size, dropout, qkv_bias,
            tie_embeddings, pad_vocab_multiple, parametrization, mup_base_width,
        )
        # µP's width multiplier (1 under the standard parametrization, which it leaves bitwise as it was).
        self.width_mult = embedding_dim / mup_base_width if parametrization == "mup" else 1.0
        self.cfg = cfg
        self.padded_vocab = padded_vocab_size(vocabulary_size, pad_vocab_multiple)
        self.tok_emb = nn.Embedding(vocabulary_size, embedding_dim)
        self.pos_emb = nn.Embedding(context_len, embedding_dim)
        self.drop_emb = nn.Dropout(dropout)
        self.trf_blocks = nn.Sequential(*(TransformerBlock(cfg) for _ in range(num_layers)))
        self.final_norm = nn.LayerNorm(embedding_dim)
        self.out_head = nn.Linear(embedding_dim, vocabulary_size, bias=False)
        # Padding rows are added after construction, without drawing random numbers: a padded
        # model's real weights come out of the generator exactly as an unpadded model's do.
        for module in (self.tok_emb, self.out_head):
            module.weight = nn.Parameter(fit_rows(module.weight.detach(), self.padded_vocab))
        self.tok_emb.num_embeddings = self.out_head.out_features = self.padded_vocab
        if tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        self._init_weights(num_layers)

    @classmethod
    def from_config(cls, cfg: GPTConfig) -> "GPTModel":
        # Accepts any object with GPTConfig's fields (the config file's model section has more).
        model = cls(**{f.name: getattr(cfg, f.name) for f in fields(GPTConfig)})
        model.activation_checkpointing = bool(getattr(cfg, "activation_checkpointing", False))
        return model

    def _init_weights(self, num_layers: int) -> None:
        # GPT-2: N(0, 0.02) everywhere, zero biases, and the projections that write into the
        # residual stream scaled by 1/sqrt(2 * num_layers) so its variance does not grow with depth.
        vocab = self.cfg.vocabulary_size
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                weight = module.weight
                if module is self.tok_emb or module is self.out_head:
                    # Only the real rows draw from the generator (padded and unpadded models start
                    # from the same weights); padding rows start, and stay, at zero.
                    nn.init.zeros_(weight[vocab:])
                    weight = weight[:vocab]
                nn.init.normal_(weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        resid_std = 0.02 / math.sqrt(2 * num_layers)
        for block in self.trf_blocks:
            nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=resid_std)
            nn.init.normal_(block.ff.proj.weight, mean=0.0, std=resid_std)
        if self.width_mult != 1.0:  # µP: hidden matrices' std as 1/sqrt(fan_in), the base width's at it
            with torch.no_grad():
                for weight in mup_hidden_matrices(self):
                    weight.mul_(1.0 / math.sqrt(self.width_mult))

    def num_parameters(self) -> int:
        """Parameters counted once each (a tied head shares the token embedding), without the
        padding rows: the model's real size, padded or not."""
        padding = (self.padded_vocab - self.cfg.vocabulary_size) * self.cfg.embedding_dim
        return sum(p.numel() for p in self.parameters()) - padding * (1 if self.cfg.tie_embeddings else 2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, seq) -> logits (batch, seq, vocabulary_size)."""
        t = idx.shape[1]
        if t > self.cfg.context_len:
            raise ValueError(f"sequence length {t} exceeds context_len {self.cfg.context_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            # Keep only each block's input; its activations are recomputed in backward (with the
            # same dropout masks: the RNG state is replayed).
            for block in self.trf_blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.trf_blocks(x)
        logits = self.out_head(self.final_norm(x))
        if self.width_mult != 1.0:  # µP's readout multiplier (not zero-init: the same model at the base width)
            logits = logits / self.width_mult
        return logits if self.padded_vocab == self.cfg.vocabulary_size else logits[..., : self.cfg.vocabulary_size]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also loads a checkpoint saved with another vocabulary padding (rows cut or zero-filled)."""
        return super().load_state_dict(fit_vocab_rows(state_dict, self.padded_vocab), strict, assign)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append up to `max_new_tokens` to `idx` (batch, seq).

        temperature 0 is greedy decoding; otherwise sample from softmax(logits / temperature),
        restricted to the `top_k` most likely tokens when given. Generation stops early once
        every row has produced `eos_id`. Pass a seeded `generator` (or seed torch) to make
        sampling reproducible.
        """
        was_training = self.training
        self.eval()
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.context_len:])[:, -1, :]
            if temperature > 0.0:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits.float(), dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            else:
                next_id = logits.argmax(dim=-1, keepdim=True)
            idx = torch.cat([idx, next_id], dim=1)
            if eos_id is not None:
                finished |= next_id.squeeze(1) == eos_id
                if bool(finished.all()):
                    break
        self.train(was_training)
        return idx
