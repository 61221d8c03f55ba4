"""Weights saved by the published TRM implementation, renamed to this model's parameters.

The published training script saves ``model.state_dict()`` of its loss head, so every key starts
with ``model.inner.`` (``_orig_mod.model.inner.`` when the model was compiled). Tensors are laid out
as here (fused qkv, fused gate/up), so only names change:

    embed_tokens.embedding_weight              -> core.embed_tokens.weight
    lm_head.weight, q_head.weight, q_head.bias -> core.lm_head.weight, core.q_head.*
    H_init, L_init                             -> core.H_init, core.L_init
    L_level.layers.<i>.self_attn.qkv_proj      -> core.blocks.<i>.mixer.qkv
    L_level.layers.<i>.self_attn.o_proj        -> core.blocks.<i>.mixer.out
    L_level.layers.<i>.mlp_t.{gate_up,down}_proj -> core.blocks.<i>.mixer.mlp.{gate_up,down}
    L_level.layers.<i>.mlp.{gate_up,down}_proj -> core.blocks.<i>.mlp.{gate_up,down}
    puzzle_emb.weights                         -> conditioner.weight (the puzzle-embedding table)
"""

from __future__ import annotations

import re

import torch

_PREFIX = re.compile(r"^(?:_orig_mod\.)?(?:model\.)?inner\.")
_RULES = [
    (re.compile(r"^embed_tokens\.embedding_weight$"), "core.embed_tokens.weight"),
    (re.compile(r"^(lm_head|q_head)\.(weight|bias)$"), r"core.\1.\2"),
    (re.compile(r"^(H_init|L_init)$"), r"core.\1"),
    (re.compile(r"^L_level\.layers\.(\d+)\.self_attn\.qkv_proj\.weight$"), r"core.blocks.\1.mixer.qkv.weight"),
    (re.compile(r"^L_level\.layers\.(\d+)\.self_attn\.o_proj\.weight$"), r"core.blocks.\1.mixer.out.weight"),
    (re.compile(r"^L_level\.layers\.(\d+)\.mlp_t\.(gate_up|down)_proj\.weight$"), r"core.blocks.\1.mixer.mlp.\2.weight"),
    (re.compile(r"^L_level\.layers\.(\d+)\.mlp\.(gate_up|down)_proj\.weight$"), r"core.blocks.\1.mlp.\2.weight"),
    (re.compile(r"^puzzle_emb\.weights$"), "conditioner.weight"),
]


def is_published(state: dict) -> bool:
    """Whether ``state`` is a published-layout state dict."""
    return any(_PREFIX.match(k) for k in state)


def from_published(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This model's state dict from a published one. A key that no rule maps raises KeyError naming
    it (a published variant this model does not implement, e.g. learned position embeddings)."""
    out = {}
    for key, tensor in state.items():
        name = _PREFIX.sub("", key)
        for pattern, target in _RULES:
            if pattern.match(name):
                out[pattern.sub(target, name)] = tensor
                break
        else:
            raise KeyError(key)
    return out
