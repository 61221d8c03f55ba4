"""The model's configuration: the recursive core's keys (``arch.*``) and the conditioner that
gives it its task context (``arch.conditioner``). It lives beside the model, so that the model
imports no data or training code; the run's whole schema (:mod:`trm.config`) builds on it.

Each conditioner validates ``arch`` with its own schema (:attr:`Conditioner.arch_schema`, a
subclass of :class:`ArchConfig` holding the conditioner's keys as well); :func:`validate_arch`
picks it from ``arch.conditioner``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ArchConfig(Strict):
    """The recursive core (TRM). Names follow the published configuration."""

    name: Literal["trm"] = Field("trm", description="the model (one kind: the recursive core)")
    conditioner: str = Field(
        "puzzle_embedding", description="what gives the core its task context (trm.model.conditioning.CONDITIONERS): "
        "puzzle_embedding (pretrain.py), or a demonstration conditioner (pretrain_encoder.py): demo_encoder")  # fmt: skip
    hidden_size: int = Field(512, ge=8, description="width of tokens, context and z states")
    num_heads: int = Field(8, ge=1, description="attention heads (hidden_size / heads must be even)")
    expansion: float = Field(4.0, gt=0, description="SwiGLU width relative to hidden_size")
    L_layers: int = Field(2, ge=1, description="blocks in the one shared stack")
    H_cycles: int = Field(3, ge=1, description="outer cycles per supervision step; all but the last without gradient")
    L_cycles: int = Field(4, ge=1, description="z_L updates per outer cycle")
    puzzle_emb_len: int = Field(16, ge=1, description="context positions prepended to the grid")
    rope_theta: float = Field(10000.0, description="rotary position base")
    rope_2d: bool = Field(
        False, description="rotary positions of the grid's cells by row and column (half the frequencies each) "
        "instead of by their index in the sequence")  # fmt: skip
    relative_2d: bool = Field(
        False, description="in place of rotary positions, attention sees each pair of cells' offset (dy, dx) through "
        "a learned key and value embedding per offset and head (context tokens with a cell included; a conditioner "
        "that reads every cell does the same in its per-pair transformer)")  # fmt: skip
    rms_norm_eps: float = Field(1e-5, description="epsilon of the RMS norms")
    mlp_t: bool = Field(False, description="replace attention by a SwiGLU over the sequence axis")
    halt_max_steps: int = Field(16, ge=1, description="ACT supervision steps per example at most (all of them in evaluation)")
    halt_exploration_prob: float = Field(0.1, ge=0, le=1, description="chance that a slot first draws a minimum number of steps")
    no_ACT_continue: bool = Field(True, description="halt on q_halt > 0 (true) or q_halt > q_continue")
    forward_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="autocast dtype of the forward pass (auto: bfloat16 on CUDA, float32 on CPU)")

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % (4 if self.rope_2d else 2):
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} heads of a width divisible "
                             f"by {4 if self.rope_2d else 2}")  # fmt: skip
        return self


def validate_arch(raw: dict | ArchConfig) -> ArchConfig:
    """``raw`` (the ``arch`` mapping) validated by the schema of the conditioner it names: an
    unknown conditioner fails listing the registered ones, a key that conditioner does not know
    fails as unknown. Raises pydantic's ValidationError, locations inside ``arch``."""
    from trm.model.conditioning import CONDITIONERS

    if isinstance(raw, ArchConfig):
        return raw
    name = raw.get("conditioner", ArchConfig.model_fields["conditioner"].default)
    if name not in CONDITIONERS:
        error = {"type": "value_error", "loc": ("conditioner",), "input": name,
                 "ctx": {"error": ValueError(f"unknown conditioner {name!r}; valid: {', '.join(sorted(CONDITIONERS))}")}}  # fmt: skip
        raise ValidationError.from_exception_data("arch", [error])
    return CONDITIONERS[name].arch_schema.model_validate(raw)
