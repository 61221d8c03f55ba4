"""The offset prior (``arch.offset_prior``): where, relative to itself, a cell of a task's output
finds what it becomes, read off the demonstrations, as a bias of the core's attention between grid
cells.

For each demonstration pair, learned colour features of the input (f) and of the output (g) are
cross-correlated at every offset o = (dy, dx) in (-(side-1)..side-1)^2, channel by channel:

    corr[c, o] = sum_p g(out[p])[c] * f(in[p + o])[c] / (cells of the output)

(a correlation layer: a displacement is where the two grids' features agree). A shift by (dy, dx) makes
corr peak at o = (-dy, -dx) in every channel that matches colours; a line running down from a
seed matches output cells to the input above them. The correlations are averaged over the task's
present demonstrations and mixed per head, (heads, channels), the mix starting at 1 in the
first ``offset_prior_heads`` heads and 0 in the others: the core then adds, to the score
from query cell p to key cell p + o, that head's value at o (:meth:`RecursiveCore.positions`), so
that a cell can look where the demonstrations say its answer lies before it knows what to look for.

Cost per pair: channels x cells x (2 side - 1)^2 multiply-adds (16 x 900 x 3,481 = 50 M at 30x30);
the core's attention at the grid's cells then takes a float bias (B, heads, T, T) instead of a key
mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trm.data.demos import cell_mask
from trm.data.grids import PAD_ID


def pair_canvases(triples: torch.Tensor, layout: str, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T, 3) cell triples (colour, second, canvas position; :mod:`trm.data.demos`) of N pairs ->
    their input and output tokens on the canvas, (N, side * side) each, PAD where no cell is given.
    Padding triples (masked) are dropped wherever they point."""
    N, L = triples.shape[0], side * side
    colour, second, position = triples.long().unbind(-1)
    given = cell_mask(triples, layout)
    if layout == "overlay":
        values = torch.stack((colour, second), dim=1)  # (N, 2, T): input, output
        where = torch.where(given, position, L).unsqueeze(1).expand(-1, 2, -1)
    else:  # one token per grid cell: channel 0 input, 1 output
        values = colour.unsqueeze(1).expand(-1, 2, -1)
        on = torch.stack((given & (second == 0), given & (second == 1)), dim=1)
        where = torch.where(on, position.unsqueeze(1), L)
        values = torch.where(on, values, PAD_ID)
    canvases = torch.full((N, 2, L + 1), PAD_ID, dtype=torch.long, device=triples.device)
    canvases.scatter_(2, where, values)  # position L collects the dropped ones
    return canvases[:, 0, :L], canvases[:, 1, :L]


class OffsetPrior(nn.Module):
    """Per-head attention bias by offset from a task's demonstrations (module docstring)."""

    def __init__(self, vocab_size: int, side: int, channels: int, heads: int, prior_heads: int | None = None):
        super().__init__()
        self.side = side
        # PAD (off the grid) has no features and matches nothing.
        self.input_features = nn.Embedding(vocab_size, channels, padding_idx=PAD_ID)
        self.output_features = nn.Embedding(vocab_size, channels, padding_idx=PAD_ID)
        with torch.no_grad():
            # Alike at the start: each colour matches itself (unit-variance features: a match scores
            # about `channels`), so a shift stands out from the first step.
            self.output_features.weight.copy_(self.input_features.weight)
        # The first ``prior_heads`` heads (default: half, at least one) start with the prior, the
        # others without it: a bias of several logits on the cell it points to leaves a head little
        # attention for the context, and the demonstrations' colours are read there.
        prior_heads = max(1, heads // 2) if prior_heads is None else prior_heads
        self.mix = nn.Parameter((torch.arange(heads) < prior_heads).float()[:, None].expand(heads, channels).clone())

    def correlate(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """(..., L) input and output canvases -> (..., channels, (2 side - 1)^2): corr[c, o] with o
        indexed as (dy + side - 1) (2 side - 1) + (dx + side - 1), the offset of the input cell
        from the output cell (:func:`trm.model.layers.cell_offsets`'s order)."""
        lead, S, C = inputs.shape[:-1], self.side, self.mix.shape[1]
        inputs, outputs = inputs.reshape(-1, S * S).long(), outputs.reshape(-1, S * S).long()
        N = inputs.shape[0]
        f = self.input_features(inputs).view(N, S, S, C).permute(0, 3, 1, 2)
        g = self.output_features(outputs).view(N, S, S, C).permute(0, 3, 1, 2)
        padded = F.pad(f, (S - 1, S - 1, S - 1, S - 1)).reshape(1, N * C, 3 * S - 2, 3 * S - 2)
        # conv2d is a correlation: out[o'] = sum_p g[p] f_padded[p + o'], o' = o + side - 1.
        corr = F.conv2d(padded, g.reshape(N * C, 1, S, S), groups=N * C).view(N, C, -1)
        cells = (outputs != PAD_ID).sum(-1).clamp_min(1).to(corr.dtype)
        return (corr / cells[:, None, None]).view(*lead, C, -1)

    def bias(self, per_pair: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """per_pair (B, D, channels, N) of :meth:`correlate`, mask (B, D) -> (B, heads, N): the mean
        over each example's present demonstrations, mixed per head (0 without demonstrations)."""
        w = mask.to(per_pair.dtype)[..., None, None]
        mean = (per_pair * w).sum(1) / w.sum(1).clamp_min(1)
        return torch.einsum("hc,bcn->bhn", self.mix.to(mean.dtype), mean)

    def flops(self, pairs: int) -> float:
        S, C = self.side, self.mix.shape[1]
        return 2.0 * pairs * C * S * S * (2 * S - 1) ** 2
