"""Fused kernels with pure-PyTorch references and a dispatch per op (`mmfm.kernels.dispatch`).

    rms_norm(x, weight, eps=1e-5, backend="auto") -> Tensor
    apply_rotary(q, k, cos, sin, position_ids=None, backend="auto") -> (q, k)
    swiglu(gate, up, backend="auto") -> Tensor
    fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", z_loss=0.0,
                               backend="auto", chunk_size=None) -> fp32 scalar
    packed_attention(q, k, v, document_ids=None, backend="auto") -> Tensor

Each op's module documents shapes, dtypes and tolerances; `mmfm.kernels.apply` puts them into a model.
"""

from mmfm.kernels.attention import packed_attention
from mmfm.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from mmfm.kernels.rms_norm import rms_norm
from mmfm.kernels.rotary import apply_rotary
from mmfm.kernels.swiglu import swiglu

__all__ = ["rms_norm", "apply_rotary", "swiglu", "fused_linear_cross_entropy", "packed_attention"]
