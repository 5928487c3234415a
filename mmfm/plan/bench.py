"""The planner's activation memory of one micro-batch against a measured run on CPU (docs/planning.md, "Checked
against runs").

`LiveTensorBytes` is a dispatch mode that keeps the running total of the bytes of every tensor storage allocated
inside it (a weak reference on each storage takes it off when it is freed) and the total's peak: on CPU, the figure
torch.cuda.max_memory_allocated gives on a GPU, without the allocator's rounding and the process's other memory.
Storages that existed before it (parameters, their gradients, buffers, the batch) are not counted, nor autocast's
bf16 copies of the parameters (casts whose input is a parameter), which the planner counts under buffers.

`activation_bench` builds the model as training does (`parallelize` on one process: kernels, activation
checkpointing), preallocates the gradients (backward then accumulates in place and allocates none of them), and
runs one micro-batch of synthetic tokens and images forward under bf16 autocast, as the trainer does for
train.precision=bf16, and backward. The measured figure is the peak of LiveTensorBytes; the predicted one the
planner's activations + logits for the same micro-batch on one device.

The CPU resolves `kernels.*=auto` to the PyTorch references, while the planner plans for a GPU, where auto is the
Triton kernel: the bench pins the references (CPU_KERNELS), which the planner then models, so that both describe
the same run. For a mixture of experts the planner counts the per-expert loop whatever kernels.experts says: an
upper bound, as torch._grouped_mm keeps less (measured on CPU under bf16 autocast: 0.96-0.97 of the loop's
prediction without checkpointing, 0.76-0.77 with full checkpointing).
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CPU_KERNELS = ["kernels.rms_norm=torch", "kernels.rotary=torch", "kernels.swiglu=torch",
               "kernels.linear_cross_entropy=torch", "kernels.experts=loop"]


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class LiveTensorBytes(TorchDispatchMode):
    """`with LiveTensorBytes(params) as live:` ... `live.peak`: the most bytes of storages allocated inside it and
    alive at once, autocast's copies of `params` apart."""

    def __init__(self, params: Sequence[torch.Tensor]):
        super().__init__()
        self.params = {_storage_key(p) for p in params}
        self.alive: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def _freed(self, key: int, nbytes: int) -> None:
        self.current -= nbytes
        self.alive.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_key(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        if func is torch.ops.aten._to_copy.default and inputs & self.params:
            return out  # autocast's copy of a parameter
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = _storage_key(t)
            if key in self.alive or key in inputs:  # counted already, or an older storage written in place
                continue
            storage, nbytes = t.untyped_storage(), t.untyped_storage().nbytes()
            self.alive[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._freed(key, nbytes))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def synthetic_batch(cfg, micro_batch: int, images_per_sample: int, seed: int = 0):
    """(input_ids, pixel_values, targets): each sample opens with its images' placeholder tokens."""
    from mmfm.config import image_tokens

    g = torch.Generator().manual_seed(seed)
    lm, v = cfg.model.language, cfg.model.vision
    ids = torch.randint(cfg.model.image_token_id + 1, lm.vocab_size, (micro_batch, cfg.data.seq_len), generator=g)
    ids[:, :images_per_sample * image_tokens(cfg)] = cfg.model.image_token_id
    pixels = torch.randn(micro_batch * images_per_sample, v.num_channels, v.image_size, v.image_size, generator=g)
    targets = torch.randint(0, lm.vocab_size, (micro_batch, cfg.data.seq_len), generator=g)
    return ids, pixels, targets


def measured_activation_bytes(cfg, micro_batch: int, images_per_sample: int = 1) -> int:
    """Peak bytes of the tensors one micro-batch's forward and backward allocate (LiveTensorBytes), the model built
    by `parallelize` on one process as the trainer builds it."""
    from mmfm.parallel import ParallelDims
    from mmfm.parallel.parallelize import parallelize

    model = parallelize(cfg, ParallelDims.from_config(cfg.parallel), torch.device("cpu")).parts[0]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ids, pixels, targets = synthetic_batch(cfg, micro_batch, images_per_sample)
    with LiveTensorBytes(list(model.parameters())) as live:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, pixels, targets=targets)
        loss.backward()
    return live.peak


def predicted_activation_bytes(cfg, micro_batch: int, images_per_sample: int = 1) -> dict[str, float]:
    """The planner's activations and logits terms for one micro-batch on one device (train.activation_checkpoint)."""
    from mmfm.plan.search import Layout, Workload, evaluate

    layout = Layout(micro_batch=micro_batch, checkpoint=cfg.train.activation_checkpoint)
    memory = evaluate(cfg, layout, Workload(1, micro_batch, cfg.data.seq_len, images_per_sample)).memory
    return {"activations": memory["activations"], "logits": memory["logits"]}


def activation_bench(overrides: Sequence[str], micro_batch: int, images_per_sample: int = 1) -> dict:
    """{"predicted": activations + logits, "measured": the peak, "terms": the planner's two terms} of one
    micro-batch of the config `overrides` give (bf16, CPU_KERNELS first, so an override may replace them)."""
    from mmfm.config import load_config

    cfg = load_config(["train.precision=bf16", *CPU_KERNELS, *overrides])
    terms = predicted_activation_bytes(cfg, micro_batch, images_per_sample)
    return {"predicted": sum(terms.values()), "measured": measured_activation_bytes(cfg, micro_batch,
                                                                                    images_per_sample),
            "terms": terms}
