"""The ``arch`` schema of the demonstration conditioners (``pretrain_encoder.py``): the core's keys
plus the encoders', named as in the experiment plan (``arch.encoder_type``,
``arch.encoder_pooling_method``, ``arch.freeze_encoder``, ``arch.encoder_num_layers``, ...)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from trm.model.config import ArchConfig


def _check_registered(kind: str, name: str) -> str:
    from encoders.registry import ENCODERS, POOLINGS

    try:
        (ENCODERS if kind == "encoder" else POOLINGS).get_valid(name)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    return name


class EncoderArchConfig(ArchConfig):
    conditioner: str = Field(
        "demo_encoder", description="what gives the core its task context: demo_encoder (an encoder of "
        "arch.encoder_type pools each demonstration pair to a vector), in_context (every demonstration cell a "
        "context token), token_set (token_set_queries learned queries over every cell), or puzzle_embedding "
        "(pretrain.py)")  # fmt: skip
    encoder_type: str = Field("standard", description="registry name: standard, lpn_standard, lpn_variational")
    encoder_pooling_method: str = Field("mean", description="pooling of a grid's cells: mean, attention, cls")
    encoder_num_layers: int | None = Field(
        None, ge=0, description="per-pair transformer depth (None: the conditioner's default: standard 2, lpn 4, "
        "in_context and token_set 1)")  # fmt: skip
    encoder_hidden_size: int | None = Field(None, ge=8, description="encoder width (None: hidden_size)")
    encoder_num_heads: int | None = Field(None, ge=1, description="None: num_heads")
    encoder_set_layers: int = Field(2, ge=1, description="layers of the set transformer across demonstrations")
    encoder_pair_layout: Literal["sequence", "overlay"] = Field(
        "sequence", description="a pair's tokens: input cells then output cells (sequence), or one token per "
        "cell holding both colours (overlay)")
    encoder_packing: bool = Field(
        True, description="encode each distinct demonstration pair of a batch once, cropped to its cells "
        "(false: every pair on the full canvas, PAD masked; the same vectors, slower)")
    encoder_context_scale: float = Field(
        1.0, gt=0, description="RMS of each context token the encoder gives the core (1: the scale of the "
        "token embeddings)")
    freeze_encoder: bool = Field(False, description="keep the encoder at its random init, out of the optimiser")
    num_demos: int | None = Field(None, ge=1, description="demonstrations given to the encoder (None: all)")
    kl_weight: float = Field(1e-4, ge=0, description="weight of the KL term (variational encoders)")
    identity_target_weight: float = Field(
        0.0, ge=0, description="identity-encoder diagnostic: weight of an MSE pulling the first context "
        "token toward a fixed random code of the puzzle id (0: off)")
    encoder_lr_scale: float = Field(1.0, gt=0, description="encoder lr = lr x encoder_lr_scale")
    encoder_lr_warmup_steps: int | None = Field(None, ge=0, description="encoder warmup (None: lr_warmup_steps)")
    token_set_queries: int = Field(16, ge=1, description="token_set: learned queries, the context tokens it gives")
    token_set_layers: int = Field(2, ge=1, description="token_set: cross-attention layers of the queries over the cells")
    contrastive_weight: float = Field(
        0.0, ge=0, description="weight of the objective against collapse: the contexts of two disjoint halves of a "
        "task's demonstrations agree and differ from the batch's other tasks' (InfoNCE; 0: off)")  # fmt: skip
    contrastive_temperature: float = Field(0.1, gt=0, description="temperature of the contrastive objective")
    latent_steps: int = Field(
        0, ge=0, description="LPN-style gradient steps on the conditioner's pair representations before the query is "
        "predicted, on the leave-one-out demonstration objective (0: off)")  # fmt: skip
    latent_lr: float = Field(0.1, gt=0, description="step size of the latent steps")
    latent_first_order: bool = Field(False, description="latent steps as constant shifts (no gradient through the steps)")
    latent_act_steps: int = Field(1, ge=1, description="ACT steps of the core in the latent steps' objective")
    offset_prior: bool = Field(
        False, description="in_context, token_set: the demonstrations' cross-correlation of output against input "
        "cells at each offset (dy, dx), learned colour features, biases the core's attention between grid cells "
        "per head (encoders/offsets.py)")  # fmt: skip
    offset_prior_channels: int = Field(16, ge=1, description="colour feature channels of the offset prior")
    offset_prior_heads: int | None = Field(
        None, ge=0, description="heads of the core whose offset prior starts switched on (the others start at 0 and "
        "learn it; None: half of num_heads, at least one)")  # fmt: skip
    colour_map: bool = Field(
        False, description="in_context, token_set: the share of each input colour's demonstration cells that became "
        "each output colour, added to the embedding of every query cell of that colour (encoders/colours.py)")  # fmt: skip
    colour_map_logits: float | None = Field(
        None, gt=0, description="with colour_map: each query cell's row of shares also added to its output logits, times a "
        "learned positive weight that starts at this value (None: off)")  # fmt: skip

    @model_validator(mode="after")
    def _sequence_of_any_length(self):
        if self.mlp_t and self.conditioner in ("in_context",):
            raise ValueError("mlp_t mixes a fixed-length sequence; in_context's context length varies")
        return self

    @model_validator(mode="after")
    def _priors_need_cells_and_attention(self):
        for prior in ("offset_prior", "colour_map"):
            if getattr(self, prior) and self.conditioner not in ("in_context", "token_set"):
                raise ValueError(f"{prior} is read off every cell of the demonstrations: arch.conditioner=in_context or "
                                 f"token_set, not {self.conditioner}")  # fmt: skip
        if self.offset_prior_heads is not None and self.offset_prior_heads > self.num_heads:
            raise ValueError(f"offset_prior_heads {self.offset_prior_heads} > num_heads {self.num_heads}")
        if self.colour_map_logits is not None and not self.colour_map:
            raise ValueError("colour_map_logits adds the colour map's rows to the logits: it needs colour_map=true")
        if self.offset_prior and self.mlp_t:
            raise ValueError("offset_prior biases attention; mlp_t has none")
        return self

    @field_validator("encoder_type")
    @classmethod
    def _known_encoder(cls, v: str) -> str:
        return _check_registered("encoder", v)

    @field_validator("encoder_pooling_method")
    @classmethod
    def _known_pooling(cls, v: str) -> str:
        return _check_registered("pooling", v)
