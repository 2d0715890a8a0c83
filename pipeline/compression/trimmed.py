"""An embedding over a vocabulary's kept rows: the module vocabulary trimming leaves in a model (pipeline.compression.vocabulary).

A subclass of nn.Embedding, so that everything that handles a table
(Torch-Pruning's embedding pruner, factorization, sensitivity, the INT8
table) handles it unchanged: its weight holds the kept rows and one shared
row, and a buffer maps every id of the original vocabulary to its row. It
exports as two Gathers (the int32 map, then the table).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class TrimmedEmbedding(nn.Embedding):
    """ids of a `vocabulary`-long table -> rows: kept[i] reads row i, every other id the last row (shared)."""

    def __init__(self, kept: Sequence[int], vocabulary: int, embedding_dim: int, padding_idx: int | None = None):
        kept = sorted(int(i) for i in kept)
        rows = torch.full((vocabulary,), len(kept), dtype=torch.int32)
        rows[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept), dtype=torch.int32)
        padding = int(rows[padding_idx]) if padding_idx is not None and padding_idx in kept else None
        # a zero table (no draw from the global random state): the rows are always copied or loaded in
        super().__init__(len(kept) + 1, embedding_dim, padding_idx=padding, _weight=torch.zeros(len(kept) + 1, embedding_dim))
        self.register_buffer("rows", rows)
        self.kept = kept
        self.vocabulary = vocabulary

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # index_select + reshape exports as Gather (an indexing expression would export as GatherND)
        rows = self.rows.index_select(0, ids.reshape(-1).long()).reshape(ids.shape)
        return F.embedding(rows, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The table rows these ids of the original vocabulary read."""
        ids = ids[(ids >= 0) & (ids < self.vocabulary)]
        return torch.unique(self.rows[ids].long())

    def fold(self, per_id: torch.Tensor) -> torch.Tensor:
        """A vocabulary-long per-id weight summed onto the rows (the shared row gets every dropped id's share)."""
        return torch.zeros(self.num_embeddings, dtype=per_id.dtype).index_add_(0, self.rows.long(), per_id[: self.vocabulary])

    def with_width(self, width: int) -> "TrimmedEmbedding":
        """The same map over a table of another width (the narrow half of a factorized embedding)."""
        padding = self.kept[self.padding_idx] if self.padding_idx is not None else None
        return TrimmedEmbedding(self.kept, self.vocabulary, width, padding)

    def extra_repr(self) -> str:
        return f"{self.vocabulary} ids -> {self.num_embeddings} rows, {self.embedding_dim}"


def vocabulary_size(layer: nn.Embedding) -> int:
    """The ids a table takes: its rows, or the original vocabulary of a trimmed one."""
    return layer.vocabulary if isinstance(layer, TrimmedEmbedding) else layer.num_embeddings
