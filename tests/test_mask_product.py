"""``MaskProduct``: the masks the loss indexes are the dense tensor's, values and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam3lora.model.mask_product import MaskProduct


def factors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(3, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)  # R=3 rows, Q=7, C=5
    pixels = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)  # h=4, w=6
    return queries, pixels


def test_indexed_masks_equal_the_dense_ones_in_value_and_gradient() -> None:
    # unsorted pairs, a repeated query, a row without pairs (row 1) and rows of different lengths
    rows, cols = np.array([2, 0, 2, 0, 2, 2]), np.array([6, 1, 0, 1, 3, 5])
    queries, pixels = factors()
    product = MaskProduct(queries, pixels)
    assert product.shape == (3, 7, 4, 6)
    weights = torch.randn(len(rows), 4, 6, dtype=torch.float64)
    lazy = product[torch.as_tensor(rows), cols]  # tensors, arrays and lists all index
    (lazy * weights).sum().backward()
    lazy_grads = queries.grad.clone(), pixels.grad.clone()
    queries.grad = pixels.grad = None
    dense = torch.einsum("rqc,rchw->rqhw", queries, pixels)[torch.as_tensor(rows), torch.as_tensor(cols)]
    (dense * weights).sum().backward()
    torch.testing.assert_close(lazy, dense)
    torch.testing.assert_close(lazy_grads, (queries.grad, pixels.grad))
    torch.testing.assert_close(product.dense(), torch.einsum("rqc,rchw->rqhw", queries, pixels))
    torch.testing.assert_close(product.sum(), product.dense().sum())
    assert product[[], []].shape == (0, 4, 6)
    with pytest.raises(IndexError, match="1-D integer sequences of one length"):
        product[[0, 1], [0]]
    with pytest.raises(ValueError, match=r"queries \(R,Q,C\) and pixels \(R,C,h,w\)"):
        MaskProduct(queries[0], pixels)
