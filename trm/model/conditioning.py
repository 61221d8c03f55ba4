"""The one seam between a task's representation and the recursive core.

A *conditioner* turns a batch into context tokens that the core prepends to the grid:

    context: (B, P, hidden), in the units of the core's scaled token embeddings

where P may be any length, and may change from batch to batch (a conditioner that reads the
demonstrations' cells makes one token per cell): the core sees the context's length only through its
shape. Where some positions are padding, ``mask`` (B, P) says which tokens are real (padding is never
attended); ``positions`` (B, P) may give each token its rotary position (the grid's cells sit at
``puzzle_emb_len + i``; default: the context at 0..P-1); ``offset_bias`` (B, heads, (2 side - 1)^2)
may add to the core's attention score from one grid cell to another a bias for their offset
(dy, dx), per head (a task's prior over where a cell's answer lies); ``input_embedding`` (B, vocab,
hidden) may add to the core's embedding of each query input token a vector per token (a task's
prior over what each colour becomes), and ``output_bias`` (B, vocab, vocab) to the output logits of
each query cell a row per input token (the same prior, in logits). Then come auxiliary losses
(already weighted, summed over the batch, added to the training loss and logged as
``train/<name>`` per sample) and metrics ((sum, count) pairs, logged as sum / count). The core
never knows where the context came from.

Everything the training loop, the optimisers, test-time adaptation, prediction and the benchmarks
need from a conditioner is asked of :class:`Conditioner` (its parameter groups, a sparse optimiser,
compilation, a dense encoding for per-task fine-tuning, what the batch must carry); none of them
tests which kind it holds. A conditioner is one file: a subclass registered under its name with
:func:`register_conditioner`, chosen by ``arch.conditioner``. This package holds the learned puzzle
embedding of the original TRM (:mod:`trm.model.puzzle_embedding`); the package ``encoders`` holds
the demonstration conditioners.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import nn

from trm.model.config import ArchConfig
from trm.registry import Registry


@dataclass
class Conditioning:
    context: torch.Tensor  # (B, P, hidden)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> weighted sum over batch
    metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (sum, count)
    mask: torch.Tensor | None = None  # (B, P) bool: real tokens (None: all)
    positions: torch.Tensor | None = None  # (B, P) long rotary positions (None: 0..P-1)
    latent: torch.Tensor | None = None  # (B, D, ...) the pair representations it came from, where latent steps apply
    offset_bias: torch.Tensor | None = None  # (B, heads, (2 side - 1)^2) attention bias between grid cells by offset (dy, dx)
    input_embedding: torch.Tensor | None = None  # (B, vocab, hidden) added to the embedding of each query input token
    output_bias: torch.Tensor | None = None  # (B, vocab, vocab) row t added to the logits of each query cell holding t

    # What the core reads besides the context, per batch row.
    PER_ROW: ClassVar[tuple[str, ...]] = ("mask", "positions", "offset_bias", "input_embedding", "output_bias")

    def rows(self, index: torch.Tensor) -> Conditioning:
        """The conditioning of batch rows ``index`` (context and what the core reads besides; no
        losses or metrics)."""
        picked = {k: None if getattr(self, k) is None else getattr(self, k)[index] for k in self.PER_ROW}
        return Conditioning(self.context[index], **picked)

    def with_context(self, context: torch.Tensor) -> Conditioning:
        """What the core reads besides the context (mask, positions, biases) around another
        ``context`` of the same shape."""
        return Conditioning(context, **{k: getattr(self, k) for k in self.PER_ROW})

    def core_inputs(self) -> tuple[torch.Tensor | None, ...]:
        """The arguments of :meth:`RecursiveCore.forward` after the inputs, in its order (context,
        context_mask, context_positions, offset_bias, input_embedding, output_bias)."""
        return self.context, self.mask, self.positions, self.offset_bias, self.input_embedding, self.output_bias


@dataclass
class ParamGroup:
    """Dense weights of a conditioner, stepped by the core's optimiser at ``lr_scale`` x the run's
    learning rate and warmed up over ``warmup`` steps (None: the run's ``lr_warmup_steps``); the
    rate in use is logged as ``train/<name>``."""

    name: str
    params: list[nn.Parameter]
    lr_scale: float = 1.0
    warmup: int | None = None


class SparseOptimizer(Protocol):
    """An optimiser of weights updated row by row from what a step looked up (the puzzle-embedding
    table): the loop sets ``lr`` from ``base_lr`` on the run's schedule (logged as
    ``train/<name>``), gathers the gradient over ranks (before clipping and the finite check), then
    steps with it."""

    name: str
    base_lr: float
    lr: float

    def gathered_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def step(self, gathered: tuple[torch.Tensor, torch.Tensor] | None, ok: torch.Tensor | None) -> None: ...


@dataclass(frozen=True)
class LatentSteps:
    """LPN-style steps on a conditioner's latent (its pair representations) before the query is
    predicted: ``steps`` gradient steps of size ``lr`` on the leave-one-out demonstration objective
    (each demonstration's output predicted from its input, the core run ``act_steps`` ACT steps,
    with the context of the task's other demonstrations), differentiated through in training
    unless ``first_order`` (:meth:`trm.model.trm.TinyRecursiveModel.condition`)."""

    steps: int
    lr: float
    first_order: bool = False
    act_steps: int = 1


class Conditioner(nn.Module):
    """Base class of every conditioner.

    Class attributes, read before one is built:
    - ``reads_demonstrations``: whether it computes the context from the task's demonstration pairs
      (``pretrain_encoder.py`` trains it) or learns it per puzzle (``pretrain.py``);
    - ``arch_schema``: the schema of ``arch`` with this conditioner (its own keys beside the core's).

    Instance attributes:
    - ``demos``: what the batch must carry of the demonstrations: None (nothing), ``"padded"``
      (demo_inputs, demo_labels, demo_mask on the canvas), or a pair layout (``"sequence"``,
      ``"overlay"``: ``demos``, the pairs packed for that layout; :mod:`trm.data.demos`);
    - ``context_positions``: how many leading context positions it fills (None: all); test-time
      search of the context moves only those;
    - ``latent_steps``: :class:`LatentSteps` the model takes on its latent before predicting (it
      then returns its pair representations as ``Conditioning.latent``), or None.
    """

    name: ClassVar[str] = ""  # its registry name, set by register_conditioner
    reads_demonstrations: ClassVar[bool] = True
    arch_schema: ClassVar[type[ArchConfig]] = ArchConfig
    demos: str | None = None
    context_positions: int | None = None
    latent_steps: LatentSteps | None = None

    @classmethod
    def build(cls, arch: ArchConfig, metadata: dict) -> Conditioner:
        """The conditioner for ``arch`` and the dataset's ``metadata`` (vocab_size, seq_len,
        grid_size, num_puzzle_identifiers)."""
        return cls(arch, metadata)

    def forward(self, batch: dict[str, torch.Tensor]) -> Conditioning:
        raise NotImplementedError

    # What the optimisers need ------------------------------------------------------------------

    def param_groups(self) -> list[ParamGroup]:
        """Its trainable dense weights, in groups with their learning rates (default: all of them
        at the core's rate, as ``encoder_lr``; frozen weights are left out)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [ParamGroup("encoder_lr", params)] if params else []

    def sparse_optimizer(self, lr: float, weight_decay: float) -> SparseOptimizer | None:
        """The optimiser of its sparsely updated weights, at the run's ``puzzle_emb_lr`` and
        ``puzzle_emb_weight_decay``; None where it has none (default)."""
        return None

    # Speed and its measurement -------------------------------------------------------------------

    def compile_parts(self) -> None:
        """torch.compile the parts worth compiling (default: none)."""

    def forward_flops(self, batch: dict[str, torch.Tensor]) -> float:
        """Matrix-product FLOPs of one forward pass over ``batch`` (the benchmark's MFU; default 0)."""
        return 0.0

    # Per-task fine-tuning of its weights (trm.adapt, eval.adapt.target=encoder|all) ----------------

    @property
    def can_fine_tune(self) -> bool:
        """Whether it has the dense encoding that per-task fine-tuning runs under ``vmap``."""
        return type(self).encode_dense is not Conditioner.encode_dense

    def encode_dense(self, demo_inputs: torch.Tensor, demo_labels: torch.Tensor) -> torch.Tensor:
        """(..., D, L) canvases of demonstration pairs, absent ones all PAD -> a representation of
        each pair, (..., D, ...), with no host-device synchronisation and shapes fixed by the input
        (it runs under ``torch.func.vmap``). :meth:`context_of_pairs` turns any subset of them into
        a context, so leave-one-out views encode each pair once."""
        raise NotImplementedError(f"the {self.name} conditioner has no dense encoding for per-task fine-tuning")

    def context_of_pairs(self, pairs: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        """The context from ``pairs`` of :meth:`encode_dense` (B, D, ...) where ``mask`` (B, D)."""
        raise NotImplementedError(f"the {self.name} conditioner has no dense encoding for per-task fine-tuning")


CONDITIONERS = Registry("conditioner")


def register_conditioner(name: str):
    """Class decorator: register a :class:`Conditioner` subclass as ``arch.conditioner=<name>``."""

    def wrap(cls):
        cls.name = name
        return CONDITIONERS.register(name)(cls)

    return wrap
