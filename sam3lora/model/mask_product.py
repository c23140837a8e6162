"""Instance mask logits left as a product in training, computed only for the queries the loss reads.

SAM 3's mask decoder predicts every query's mask as one product, per-query mask embeddings (R,Q,C) times
per-pixel embeddings (R,C,h,w) -> (R,Q,h,w) logits. The loss reads only the matched queries: a few of the
Q = 200 per row. In training, :class:`MaskProduct` keeps the two factors and computes only the indexed masks,
in one batched matrix product over the rows' matched queries. This skips the other queries' (R,Q,h,w) logits and
their gradient: 2 x R x Q x h x w values per query set, 1.1 GB each in bfloat16 for 32 rows at 1008 px.

The masks that are computed are the same numbers: each logit is the same C-long dot product.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


class MaskProduct:
    """Mask logits ``queries @ pixels`` per row, evaluated where indexed.

    Args:
        queries: (R,Q,C) per-query mask embeddings (``mask_decoder.mask_embedder`` output).
        pixels: (R,C,h,w) per-pixel embeddings (``mask_decoder.instance_projection`` output).

    ``product[rows, queries]`` with two 1-D integer indices of length n (host arrays or tensors; device
    tensors are copied to the host to group them) returns the (n,h,w) logits of those (row, query) pairs, as
    indexing the dense ``(R,Q,h,w)`` tensor would; :meth:`dense` returns all of them.
    """

    def __init__(self, queries: Tensor, pixels: Tensor) -> None:
        if queries.ndim != 3 or pixels.ndim != 4 or queries.shape[0] != pixels.shape[0] or (
                queries.shape[2] != pixels.shape[1]):
            raise ValueError(f"MaskProduct: queries (R,Q,C) and pixels (R,C,h,w) expected, got "
                             f"{tuple(queries.shape)} and {tuple(pixels.shape)}")
        self.queries = queries
        self.pixels = pixels

    @property
    def shape(self) -> torch.Size:
        """(R,Q,h,w), the dense tensor's shape."""
        return torch.Size((*self.queries.shape[:2], *self.pixels.shape[2:]))

    @property
    def device(self) -> torch.device:
        return self.queries.device

    def dense(self) -> Tensor:
        """All (R,Q,h,w) logits (what the mask decoder returns outside training)."""
        return torch.einsum("rqc,rchw->rqhw", self.queries, self.pixels)

    def sum(self) -> Tensor:
        """The sum of all the logits without forming them: sum_r (sum_q queries[r]) . (sum_hw pixels[r])."""
        return torch.einsum("rc,rc->", self.queries.sum(1), self.pixels.sum((2, 3)))

    def float(self) -> MaskProduct:
        return MaskProduct(self.queries.float(), self.pixels.float())

    def __getitem__(self, key: tuple[Any, Any]) -> Tensor:
        """(n,h,w) logits of the (row, query) pairs ``key = (rows, queries)``."""
        rows, queries = (_host_index(k) for k in key)
        if rows.ndim != 1 or rows.shape != queries.shape:
            raise IndexError(f"MaskProduct: index with two 1-D integer sequences of one length, got shapes "
                             f"{rows.shape} and {queries.shape}")
        num_rows, _, height, width = self.shape
        # host bookkeeping: each pair's slot among its row's pairs, the rows' queries padded to the longest row
        counts = np.bincount(rows, minlength=num_rows)
        order = np.argsort(rows, kind="stable")
        slot = np.empty_like(rows)
        slot[order] = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows[order]]
        padded = np.zeros((num_rows, counts.max(initial=0)), dtype=np.int64)
        padded[rows, slot] = queries
        device = self.queries.device
        index = torch.from_numpy(padded).to(device)[..., None].expand(-1, -1, self.queries.shape[2])
        masks = torch.bmm(torch.gather(self.queries, 1, index), self.pixels.flatten(2))  # (R, longest row, h*w)
        pairs = torch.from_numpy(rows).to(device), torch.from_numpy(slot).to(device)
        return masks[pairs].unflatten(-1, (height, width))


def _host_index(index: Any) -> np.ndarray:
    """An integer index as a host int64 array (a device tensor is copied over: a synchronisation)."""
    if isinstance(index, Tensor) and index.device.type != "cpu":
        index = index.cpu()
    return np.asarray(index, dtype=np.int64)
