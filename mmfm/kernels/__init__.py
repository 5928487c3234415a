"""Fused kernels with pure-PyTorch references and a dispatch per op (`mmfm.kernels.dispatch`)."""
