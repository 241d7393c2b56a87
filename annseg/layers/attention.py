"""The one attention kernel every block calls: softmax(Q K^T / sqrt(Ck)) V.

Two paths compute the same function:
- fused: ``torch.nn.functional.scaled_dot_product_attention``. On the CPU and on CUDA it
  tiles over queries, so the (N, S) similarity map is never held in memory at once; this is
  what makes the full non-local block fit in a few hundred MiB instead of gigabytes.
- reference: plain ``bmm`` + ``softmax``, easy to read, used by tests and FLOP counting.

``attention_weights`` is the reference path's softmax alone; ``AttentionProbe`` uses it to read
the weights of a few query positions out of a block's real forward (``annseg attention``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(query: Tensor, key: Tensor, value: Tensor, *, fused: bool = True) -> Tensor:
    """Attend from every query to every key.

    Args:
        query: (B, N, Ck), one row per position.
        key: (B, S, Ck), the anchors (S = N for the standard non-local block).
        value: (B, S, Cv).
        fused: use ``scaled_dot_product_attention``; ``False`` gives the plain reference path.

    Returns:
        (B, N, Cv): for each position, the softmax-weighted sum of the values.
    """
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise ValueError(
            "attention expects query (B, N, Ck), key (B, S, Ck) and value (B, S, Cv); got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if fused:
        # (B, 1, N, C): one head, in the dtype of the query (autocast may leave them apart).
        q, k, v = (_dense(t.unsqueeze(1).to(query.dtype)) for t in (query, key, value))
        return F.scaled_dot_product_attention(q, k, v).squeeze(1)
    weights = attention_weights(query, key)  # (B, N, S)
    return torch.bmm(weights, value.to(weights.dtype))  # (B, N, Cv)


def attention_weights(query: Tensor, key: Tensor) -> Tensor:
    """softmax(Q K^T / sqrt(Ck)): (B, N, Ck) queries, (B, S, Ck) keys -> (B, N, S), rows sum to 1."""
    scale = query.shape[-1] ** -0.5
    similarity = torch.bmm(query, key.transpose(1, 2)) * scale  # (B, N, S)
    return similarity.softmax(dim=-1)


@dataclass
class AttentionProbe:
    """Set as a block's ``probe`` to record the attention weights of some query positions.

    ``rows(H, W)`` gets the size of the block's query map and returns the flat indices
    (row-major, ``y * W + x``) of the positions to record, so a caller can choose positions
    before it knows the map's size. During the block's forward, ``weights`` becomes
    (B, P, S), ``attention_weights`` of those queries against the block's own anchor keys;
    ``query_size`` and ``anchor_size`` the (H, W) of the query map and of the map the anchors
    are pooled from. The block's output is unchanged.
    """

    rows: Callable[[int, int], Tensor]
    weights: Tensor | None = None
    query_size: tuple[int, int] | None = None
    anchor_size: tuple[int, int] | None = None

    def record(self, query: Tensor, anchor_keys: Tensor, query_size: tuple[int, int],
               anchor_size: tuple[int, int]) -> None:
        """Called by the block's forward with its (B, N, Ck) queries and (B, S, Ck) anchor keys."""
        rows = self.rows(*query_size).to(query.device)
        self.weights = attention_weights(query[:, rows].to(anchor_keys.dtype), anchor_keys).detach()
        self.query_size, self.anchor_size = tuple(query_size), tuple(anchor_size)


def _dense(t: Tensor) -> Tensor:
    """``t`` with row-major strides. ``contiguous()`` keeps odd strides on size-1 axes (one
    anchor, S = 1), which CUDA's memory-efficient kernel rejects ("no kernel found")."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= size
    return t if t.stride() == tuple(reversed(expected)) else t.clone(memory_format=torch.contiguous_format)
