"""The device the kernel tests run on: CPU, with Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), unless MMFM_TEST_DEVICE=cuda, where the same tests run compiled kernels on the GPU
(scripts/gpu_kernel_check.sh). Tensors are drawn on CPU from seeded generators, then moved."""

import os

import torch

DEVICE = torch.device(os.environ.get("MMFM_TEST_DEVICE", "cpu"))
ON_GPU = DEVICE.type == "cuda"
