"""Packed-sequence attention: documents packed in one row never attend across their boundaries, on
every backend this machine has (CPU: SDPA forward and backward, FlexAttention forward)."""

import pytest
import torch
import torch.nn.functional as F

from devices import DEVICE

from mmfm.kernels.attention import available_backends, cumulative_lengths, packed_attention
from mmfm.models.attention import document_mask

LENGTHS = [[5, 7, 4], [16], [1, 9, 6]]  # documents per row, 16 positions each


def packed_inputs(dtype=torch.float32, heads=2, dim=16):  # FlexAttention on CUDA needs dim >= 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(len(LENGTHS), heads, 16, dim, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
               for _ in range(3))
    ids = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in LENGTHS], device=DEVICE)
    return q, k, v, ids


def separately(q, k, v):
    """Each document through causal SDPA on its own, concatenated back."""
    rows = []
    for b, row in enumerate(LENGTHS):
        parts, start = [], 0
        for n in row:
            sl = slice(start, start + n)
            parts.append(F.scaled_dot_product_attention(q[b:b + 1, :, sl], k[b:b + 1, :, sl], v[b:b + 1, :, sl],
                                                        is_causal=True))
            start += n
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows)


@pytest.mark.parametrize("backend", available_backends(DEVICE, torch.float32, training=False))
def test_packed_forward_equals_documents_run_separately(backend):
    q, k, v, ids = (t.detach() for t in packed_inputs())
    with torch.no_grad():
        got = packed_attention(q, k, v, ids, backend=backend)
        want = separately(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", available_backends(DEVICE, torch.float32, training=True))
def test_packed_backward_equals_documents_run_separately(backend):
    q, k, v, ids = packed_inputs()
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad((packed_attention(q, k, v, ids, backend=backend) * upstream).sum(), (q, k, v))
    want = torch.autograd.grad((separately(q, k, v) * upstream).sum(), (q, k, v))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_no_attention_across_documents():
    """Changing a later document's keys and values leaves every earlier document's output unchanged."""
    q, k, v, ids = packed_inputs()
    with torch.no_grad():
        before = packed_attention(q, k, v, ids)
        k2, v2 = k.clone(), v.clone()
        k2[0, :, 5:], v2[0, :, 5:] = 100.0, -100.0  # documents 1 and 2 of row 0
        after = packed_attention(q, k2, v2, ids)
    torch.testing.assert_close(after[0, :, :5], before[0, :, :5], rtol=0, atol=0)
    assert not torch.allclose(after[0, :, 5:], before[0, :, 5:])


def test_cumulative_lengths_and_mask():
    _, _, _, ids = packed_inputs()
    cu, longest = cumulative_lengths(ids)
    assert cu.tolist() == [0, 5, 12, 16, 32, 33, 42, 48] and longest == 16
    mask = document_mask(ids)
    assert mask.shape == (3, 1, 16, 16)
    assert mask[0, 0, 6].tolist() == [False] * 5 + [True, True] + [False] * 9


def test_unavailable_backend_is_a_clear_error():
    q, k, v, ids = packed_inputs()
    with pytest.raises(ValueError, match="attention backend 'flash' cannot run here"):
        packed_attention(q, k, v, ids, backend="flash")
