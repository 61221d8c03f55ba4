"""The colour map (``arch.colour_map``): what each colour becomes, read off the demonstrations and
added to the embedding of every query cell of that colour.

For each demonstration pair, count[a, b] is the number of canvas cells holding token a in the input
and token b in the output (PAD in either: not counted). Summed over the task's present
demonstrations and normalised per input token, row a is the share of a's cells that became each
token: one-hot at b where the demonstrations map a to b, spread where they disagree, 0 where no
demonstration shows a. Through a learned (vocab, hidden) map the core adds row a to the embedding
of every query input cell holding a (``Conditioning.input_embedding``): each query cell carries what
the demonstrations did to its colour, so that a colour map never trained (a held-out colour pair, a
new family's cycle) arrives in the same form as a trained one. It sees cells that keep their place:
where a cell's answer lies is the offset prior's (encoders/offsets.py); in a task that moves or
resizes its grid the rows are a blur, which the core learns to weigh.

With ``arch.colour_map_logits`` the rows also go straight to the output: row a, times a learned
positive weight, is added to the logits of every query cell holding a (``Conditioning.output_bias``). The
embedding path leaves the core to combine "this cell holds a" with "a became b", a combination it
has never seen for a held-out pair; the logit path proposes b whatever a is, and the core has only
to leave it standing (or outvote it where the cell's answer lies elsewhere).

Cost: vocab^2 multiply-adds per cell of each pair, and a (B, vocab, hidden) table.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trm.data.grids import PAD_ID
from trm.model.layers import trunc_normal_


class ColourMap(nn.Module):
    """A task's token-to-token map from its demonstrations, as a per-token input embedding (and,
    with the logit path, a per-token output bias)."""

    def __init__(self, vocab_size: int, hidden_size: int, logit_weight: float | None = None):
        super().__init__()
        # Row b: "this cell becomes b", at the scale of the core's scaled token embeddings.
        self.to_hidden = nn.Parameter(trunc_normal_(torch.empty(vocab_size, hidden_size), 1.0))
        # Learned in log space: the core's own logits grow to tens or a hundred over a run (stablemax
        # is linear above 0), and an optimiser's steps of about lr each would leave a plain weight behind.
        self.log_logit_weight = None if logit_weight is None else nn.Parameter(torch.tensor(math.log(logit_weight)))

    def count(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """(..., L) input and output canvases -> (..., vocab, vocab): count[a, b] of the cells
        holding a in the input and b in the output."""
        tokens = torch.arange(self.to_hidden.shape[0], device=inputs.device)
        inputs, outputs = inputs.long(), outputs.long()
        both = ((inputs != PAD_ID) & (outputs != PAD_ID))[..., None]
        # One-hot rows (..., L, vocab) by comparison: no range check synchronising with the device.
        a = ((inputs[..., None] == tokens) & both).to(self.to_hidden.dtype)
        b = (outputs[..., None] == tokens).to(self.to_hidden.dtype)
        return a.transpose(-1, -2) @ b

    def shares(self, per_pair: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """per_pair (B, D, vocab, vocab) of :meth:`count`, mask (B, D) -> (B, vocab, vocab): each
        input token's row of shares over the present demonstrations (0 for a token no present
        demonstration shows)."""
        counts = (per_pair * mask.to(per_pair.dtype)[..., None, None]).sum(1)
        return counts / counts.sum(-1, keepdim=True).clamp_min(1)

    def embedding(self, shares: torch.Tensor) -> torch.Tensor:
        """(B, vocab, vocab) shares -> (B, vocab, hidden): each row mapped to the core's width."""
        return shares @ self.to_hidden.to(shares.dtype)

    def logits(self, shares: torch.Tensor) -> torch.Tensor | None:
        """(B, vocab, vocab) shares -> the core's output bias (B, vocab, vocab), None without the
        logit path."""
        return None if self.log_logit_weight is None else self.log_logit_weight.exp().to(shares.dtype) * shares

    def flops(self, pairs: int, cells: int) -> float:
        vocab = self.to_hidden.shape[0]
        return 2.0 * pairs * cells * vocab * vocab
