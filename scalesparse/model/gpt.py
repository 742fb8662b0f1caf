"""A decoder-only GPT, small enough to read in one sitting.

Module names follow transformers' Llama (embed_tokens, layers.N.self_attn.q_proj, …, norm, lm_head),
so a swiglu/rotary/rmsnorm/bias-free model exports as a LlamaForCausalLM by adding a "model." prefix.
The MLP is pluggable (`model.mlp` names an entry of scalesparse.model.mlp.MLPS) and every Linear
inside the blocks is a MaskedLinear that a sparsity algorithm can put a mask on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scalesparse.config import ModelConfig, MoEConfig
from scalesparse.model.layers import MaskedLinear, Rotary, make_norm, rope_inv_freq
from scalesparse.model.mlp import MLPS
from scalesparse.model.moe.backends import Experts
from scalesparse.model.moe.layer import MoEMLP


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (n_kv_heads ≤ n_heads), RoPE and an optional
    sliding window."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = MaskedLinear(cfg.d_model, q_out, bias=qkv_bias)
        self.k_proj = MaskedLinear(cfg.d_model, kv_out, bias=qkv_bias)
        self.v_proj = MaskedLinear(cfg.d_model, kv_out, bias=qkv_bias)
        self.o_proj = MaskedLinear(q_out, cfg.d_model, bias=cfg.bias)
        self.o_proj.residual_out = True
        self.dropout = cfg.dropout
        self.sliding_window = cfg.sliding_window
        self.rotary = None
        if cfg.position == "rotary":
            inv_freq = rope_inv_freq(self.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor,
                                     cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                                     cfg.rope_original_max_len)  # fmt: skip
            self.rotary = Rotary(self.head_dim, cfg.seq_len, cfg.rope_theta, inv_freq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, heads·head_dim) → (B, heads, T, head_dim)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        if self.n_kv_heads != self.n_heads:  # each k/v head serves a contiguous group of query heads
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        p = self.dropout if self.training else 0.0
        if self.sliding_window is not None and self.sliding_window < T:
            # query i sees keys j with i - window < j <= i (Mistral's window); a bool mask, True = attend
            i = torch.arange(T, device=x.device)
            dist = i[:, None] - i[None, :]
            mask = (dist >= 0) & (dist < self.sliding_window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        self.input_layernorm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.mlp = MLPS.get(cfg.mlp)(cfg, moe)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.input_layernorm(x)))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, moe: MoEConfig | None = None, init: bool = True) -> None:
        """init False: leave the weights as allocated, for a checkpoint to be read into (under ZeRO-3's
        zero.Init, drawing them here would gather every partitioned weight whole)."""
        super().__init__()
        self.cfg = cfg
        moe = moe or MoEConfig()
        self.vocab_size = vocab_size
        self.embed_tokens = nn.Embedding(vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, moe) for _ in range(cfg.n_layers))
        self.last_losses: dict[str, torch.Tensor] = {}
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        if cfg.tie_embeddings:  # the head is the embedding: made 1×1, so no (vocab, d) matrix is made to be dropped
            self.lm_head = nn.Linear(1, 1, bias=False)
            self.lm_head.weight = self.embed_tokens.weight
            self.lm_head.in_features, self.lm_head.out_features = cfg.d_model, vocab_size
        else:
            self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if init:
            self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            # GPT-2's scaled init of residual projections keeps the residual stream's variance flat
            if getattr(module, "residual_out", False):
                std = std / math.sqrt(2 * self.cfg.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Experts):
            nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
            nn.init.normal_(module.down_proj, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layers))

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # idx, targets: (B, T) token ids; returns logits (B, T, V) and the mean next-token loss
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than model.seq_len={self.cfg.seq_len}")
        x = self.embed_tokens(idx)
        if self.embed_positions is not None:
            x = x + self.embed_positions(torch.arange(T, device=idx.device))
        x = self.drop(x)
        for block in self.layers:
            x = block(x)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
            self.last_losses = {"ce": loss.detach()}
            moe = self.moe_layers()
            if moe and self.training:  # validation loss stays pure next-token cross-entropy
                aux = torch.stack([m.aux_loss for m in moe]).sum()
                self.last_losses["moe_aux"] = aux.detach()
                loss = loss + aux
        return logits, loss

    def moe_layers(self) -> list[MoEMLP]:
        return [b.mlp for b in self.layers if isinstance(b.mlp, MoEMLP)]

    # -- accounting ---------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if self.embed_positions is not None:
                n -= self.embed_positions.weight.numel()
        return n


def active_params(model: GPT) -> int:
    """Parameters one token uses: all but the E−k experts it skips in each MoE layer."""
    n = model.num_params()
    for m in model.moe_layers():
        n -= sum(p.numel() for p in m.parameters()) - m.active_matmul_params()
    return n


def count_flops_per_token(cfg: ModelConfig, vocab_size: int, model: GPT | None = None,
                          moe: MoEConfig | None = None) -> dict[str, int]:  # fmt: skip
    """Forward and training FLOPs per token (2 per multiply-add; training = 3 × forward).

    Matmul FLOPs of the weights a token actually multiplies with (Linear layers incl. LM head and
    routers, k experts per MoE layer), plus attention scores and values (2·2·T·d per layer per token,
    the full-T convention of the PaLM paper's appendix).
    """
    if model is None:
        model = GPT(cfg, vocab_size, moe)
    moe_layers = model.moe_layers()
    in_moe = {id(m) for layer in moe_layers for m in layer.modules()}
    matmul = sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in in_moe)
    matmul += sum(2 * layer.active_matmul_params() for layer in moe_layers)
    attention = cfg.n_layers * 2 * 2 * cfg.seq_len * cfg.n_heads * cfg.attn_head_dim
    forward = matmul + attention
    return {"forward": forward, "train": 3 * forward}
