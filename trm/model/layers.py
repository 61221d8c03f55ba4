"""Building blocks shared by the recursive core and the demo encoders."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


IGNORE_INDEX = -100  # a label left out of a loss (PyTorch's convention; the datasets' ignore_label_id)


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log of s(x) / sum s(x), with s(x) = 1 / (1 - x) for x < 0 and x + 1 otherwise."""
    # Each branch only sees the inputs it applies to: 1 / (1 - x) evaluated at x = 1 would be inf,
    # and torch.where's backward turns the unused branch's 0 * inf into a NaN gradient.
    s = torch.where(x < 0, 1 / (1 - x.clamp(max=0)), x.clamp(min=0) + 1)
    return torch.log(s / s.sum(dim=dim, keepdim=True))


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token loss (B, L) in float64; zero where the label is ignored. logits: (B, L, V)."""
    logprobs = log_stablemax(logits.to(torch.float64))
    valid = labels != ignore_index
    picked = logprobs.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return -torch.where(valid, picked, 0)


def cell_offsets(cells: torch.Tensor, side: int) -> torch.Tensor:
    """(B, T) canvas cell of each token (row-major on a side x side canvas; -1: a token without a
    cell) -> (B, T, T) index of each pair's offset (dy, dx) of key j from query i, one of
    (2 side - 1)^2, or (2 side - 1)^2 where either token has no cell."""
    span = 2 * side - 1
    row, col = torch.div(cells, side, rounding_mode="floor"), cells % side
    dy, dx = row[:, None, :] - row[:, :, None], col[:, None, :] - col[:, :, None]
    index = (dy + side - 1) * span + (dx + side - 1)
    both = (cells[:, None, :] >= 0) & (cells[:, :, None] >= 0)
    return torch.where(both, index, span * span)


def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal truncated at two standard deviations, rescaled so that the *truncated* distribution
    has standard deviation ``std`` (plain truncation would shrink it by about 12 %)."""
    base = 0.8796256610342398  # std of a unit normal truncated to [-2, 2]
    s = std / base
    return nn.init.trunc_normal_(tensor, std=s, a=-2 * s, b=2 * s)


def linear(in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """nn.Linear with LeCun (fan-in) truncated-normal weights and zero bias."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    trunc_normal_(layer.weight, 1.0 / math.sqrt(in_features))
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or in its own dtype where that is wider (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm without a learnable weight, computed in float32 (or wider), returned in x's dtype."""
    x32 = at_least_float32(x)
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def swiglu_width(hidden: int, expansion: float) -> int:
    """Intermediate width of a SwiGLU: 2/3 of ``expansion * hidden``, rounded up to 256."""
    return -(-round(expansion * hidden * 2 / 3) // 256) * 256


def block_flops(B: int, T: int, H: int, expansion: float, layers: int) -> float:
    """Matrix-product FLOPs (2 per multiply-add) of ``layers`` attention blocks of width ``H`` over
    B sequences of T tokens: qkv, scores and values, out, gate/up, down."""
    I = swiglu_width(H, expansion)  # noqa: E741
    per_layer = 2 * T * 3 * H * H + 4 * T * T * H + 2 * T * H * H + 2 * T * 2 * H * I + 2 * T * I * H
    return float(B * layers * per_layer)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, expansion: float):
        super().__init__()
        inter = swiglu_width(hidden, expansion)
        self.gate_up = linear(hidden, 2 * inter)
        self.down = linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Rotary(nn.Module):
    """Rotary position embedding tables for positions 0..max_len-1. cos/sin: (max_len, head_dim).

    With ``grid=(offset, side)`` the positions from ``offset`` on are the cells of a side x side
    canvas in row-major order, and rotate in two dimensions: half the frequencies by the cell's
    row, half by its column, so that a relative offset (dy, dx) is one rotation wherever it lies
    (a column is a fixed dx; in one dimension it would be every multiple of the side). The positions
    before ``offset`` (context tokens without a cell) sit on row -1, at column t."""

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0, grid: tuple[int, int] | None = None):
        super().__init__()
        t = torch.arange(max_len, dtype=torch.float32)
        if grid is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            freqs = torch.outer(t, inv_freq)
        else:
            offset, side = grid
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)))
            cell = (t - offset).clamp_min(0)
            row = torch.where(t < offset, -1.0, torch.div(cell, side, rounding_mode="floor"))
            col = torch.where(t < offset, t, cell % side)
            freqs = torch.cat((torch.outer(row, inv_freq), torch.outer(col, inv_freq)), dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def tables(self, length: int, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of a sequence: positions 0..length-1, (length, head_dim); or the given
        ``positions`` (B, length) of each token, (B, 1, length, head_dim)."""
        if positions is None:
            return self.cos[:length], self.sin[:length]
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, head_dim); cos, sin: (T, head_dim) or (B, 1, T, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype))


def attention_weights(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over keys of ``scores`` (B, heads, T, T) in at least float32, after ``mask``: bool
    (B, 1, 1, T), False where a key may not be attended, or an additive float bias."""
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    return torch.softmax(at_least_float32(scores), dim=-1)


class Attention(nn.Module):
    """Non-causal multi-head self-attention, optionally with rotary positions, a key mask, and
    learned relative offsets.

    With ``offsets`` (the number of distinct relative offsets between two tokens, e.g. the (dy, dx)
    of two cells), each head learns a key and a value embedding per offset (relative attention with
    key and value terms): the score of query i for key j gains q_i . rK[o_ij] / sqrt(d), and the
    output gains sum_j a_ij rV[o_ij]. The first lets a head look at a cell by where it is from the
    query (an offset that the query's content can choose); the second lets it read where what it
    found lies. Computed per offset, not per pair: q . rK for every offset (B, heads, T, N), then
    gathered; the weights summed per offset, then times rV.
    """

    def __init__(self, hidden: int, num_heads: int, offsets: int | None = None):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = linear(hidden, 3 * hidden)
        self.out = linear(hidden, hidden)
        self.offset_keys = self.offset_values = None
        if offsets is not None:
            d = hidden // num_heads
            self.offset_keys = nn.Parameter(trunc_normal_(torch.empty(num_heads, offsets, d), 1.0 / math.sqrt(d)))
            self.offset_values = nn.Parameter(trunc_normal_(torch.empty(num_heads, offsets, d), 1.0 / math.sqrt(d)))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_mask: torch.Tensor | None = None, offsets: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """x: (B, T, hidden); rope: (cos, sin) of :meth:`Rotary.tables`, or None; key_mask: (B, T)
        bool, True where a key may be attended, or an additive float bias of every score (B, heads,
        T, T), -inf where a key may not be attended; offsets: (B, T, T) long, the offset of key j
        from query i (with relative offsets)."""
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, H // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        bias = key_mask is not None and key_mask.dtype != torch.bool
        mask = None if key_mask is None else key_mask.to(q.dtype) if bias else key_mask[:, None, None, :]
        if self.offset_keys is not None:
            y = self._relative(q, k, v, mask, offsets)
        elif bias and not q.is_cuda:
            # A float bias (the offset prior) on CPU: written out, since the fused CPU kernel, which
            # vmap picks for per-task fine-tuning, has no gradient for the bias.
            y = attention_weights(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), mask).to(q.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, H))

    def _relative(self, q, k, v, mask, offsets):
        """Attention with the offset terms; q, k, v: (B, heads, T, d); offsets: (B, T, T)."""
        scale = 1.0 / math.sqrt(q.shape[-1])
        index = offsets[:, None].expand(-1, q.shape[1], -1, -1)  # (B, heads, T, T)
        per_offset = torch.einsum("bhtd,hnd->bhtn", q, self.offset_keys.to(q.dtype))
        scores = (q @ k.transpose(-1, -2) + per_offset.gather(-1, index)) * scale
        weights = attention_weights(scores, mask).to(q.dtype)
        by_offset = weights.new_zeros(*weights.shape[:-1], self.offset_keys.shape[1]).scatter_add_(-1, index, weights)
        return weights @ v + torch.einsum("bhtn,hnd->bhtd", by_offset, self.offset_values.to(q.dtype))


class SequenceMLP(nn.Module):
    """TRM's ``mlp_t`` token mixer: a SwiGLU applied along the sequence axis instead of attention."""

    def __init__(self, seq_len: int, expansion: float):
        super().__init__()
        self.mlp = SwiGLU(seq_len, expansion)

    def forward(self, x: torch.Tensor, rope=None, key_mask: torch.Tensor | None = None, offsets=None) -> torch.Tensor:
        return self.mlp(x.transpose(1, 2)).transpose(1, 2)


class Block(nn.Module):
    """Token mixer (attention, or a sequence MLP) then SwiGLU, each in a residual branch.

    ``post_norm`` (TRM): x = norm(x + f(x)). Otherwise pre-norm: x = x + f(norm(x)).
    """

    def __init__(self, hidden: int, num_heads: int, expansion: float, post_norm: bool = True,
                 eps: float = 1e-5, seq_mlp_len: int | None = None, offsets: int | None = None):
        super().__init__()
        self.mixer = SequenceMLP(seq_mlp_len, expansion) if seq_mlp_len else Attention(hidden, num_heads, offsets)
        self.mlp = SwiGLU(hidden, expansion)
        self.post_norm, self.eps = post_norm, eps

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_mask: torch.Tensor | None = None, offsets: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        if self.post_norm:
            x = rms_norm(x + self.mixer(x, rope, key_mask, offsets), self.eps)
            return rms_norm(x + self.mlp(x), self.eps)
        x = x + self.mixer(rms_norm(x, self.eps), rope, key_mask, offsets)
        return x + self.mlp(rms_norm(x, self.eps))
