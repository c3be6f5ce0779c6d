"""GPT-2, written to be read top to bottom.

Parameter names follow Hugging Face's `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn.weight`, ...)
so that conversion is a rename-free copy plus a transpose: HF stores its linear layers as Conv1D
with weight [in, out]; we use nn.Linear with weight [out, in]. No distribution logic lives here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from modeconn.errors import ConfigError


@dataclass
class ModelConfig:
    """Architecture of one GPT-2. `preset` fills every field; other keys given beside it win."""

    preset: Optional[str] = None
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: Optional[int] = None  # FFN width; None means 4 * n_embd, as in GPT-2
    block_size: int = 1024  # context length (HF: n_positions)
    vocab_size: int = 50257
    pad_vocab_to: int = 1  # round the embedding rows up to a multiple of this (64 is fast on GPUs)
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    activation: Literal["gelu", "gelu_new"] = "gelu_new"
    init_std: float = 0.02
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pad_vocab_to"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_inner is not None and self.n_inner < 1:
            raise ConfigError(f"model.n_inner must be >= 1 or null, got {self.n_inner}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def ffn_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_to) * self.pad_vocab_to

    @staticmethod
    def preset_values(name: Optional[str]) -> dict:
        if name is None:
            return {}
        if name not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return dict(PRESETS[name])

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        return cls(**{"preset": name, **cls.preset_values(name), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


_GPT2 = dict(vocab_size=50257, block_size=1024, dropout=0.0, bias=True, tie_embeddings=True,
             activation="gelu_new", n_inner=None)
PRESETS: dict[str, dict] = {
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    # The seed study's GPT-2 (design.md section 4).
    "paper-small": dict(_GPT2, n_layer=6, n_head=4, n_embd=256, n_inner=1024, block_size=256,
                        dropout=0.1, tie_embeddings=False),
    # The seed study's spectral-analysis model: 8 layers, d=1024, FFN 4096.
    "paper-spectral": dict(_GPT2, n_layer=8, n_head=16, n_embd=1024, n_inner=4096, block_size=256,
                           dropout=0.1, tie_embeddings=False),
    # Small enough for CPU tests in seconds, with the real GPT-2 vocabulary.
    "tiny": dict(_GPT2, n_layer=2, n_head=2, n_embd=64, n_inner=256, block_size=64, tie_embeddings=False),
}
assert all(set(p) <= {f.name for f in fields(ModelConfig)} for p in PRESETS.values())


class Linear(nn.Linear):
    """nn.Linear with its bias added after the product, x Wᵀ + b, not fused into it (addmm).
    Why: DeepSpeed's ZeRO-3 computes linear layers this way (its memory-efficient linear), and
    the fused form rounds differently on some CPUs' MKL (seen on AMD EPYC), so with this form every
    ZeRO stage computes the same bits. Same parameters, names and state dict as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return y if self.bias is None else y + self.bias


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # Q, K, V stacked on the out axis
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # [B, T, C] -> [B, heads, T, head_dim]
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, cfg.ffn_width, bias=cfg.bias)
        self.c_proj = Linear(cfg.ffn_width, cfg.n_embd, bias=cfg.bias)
        self.approximate = "tanh" if cfg.activation == "gelu_new" else "none"  # gelu_new is GPT-2's tanh form
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    block_modules = ("transformer.h",)  # whose linear weights are block matrices (optim/roles.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.checkpoint_blocks = False  # activation checkpointing: recompute each block in backward
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, init_std) weights, zero biases, unit gains; the residual-stream output
        projections scaled by 1/sqrt(2 * n_layer) (GPT-2 paper, section 2.3)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name:  # LayerNorm gains
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """idx, targets: [B, T] token ids. Returns (logits [B, T, vocab_size], mean loss or None)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds model.block_size={self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpoint_blocks and self.training else block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        # Padding rows exist only to make the matmul fast; they are never a prediction.
        logits = logits[..., : self.config.vocab_size]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_parameters(self, exclude_position_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied weight is counted once
        return n - self.transformer.wpe.weight.numel() if exclude_position_embeddings else n

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx
