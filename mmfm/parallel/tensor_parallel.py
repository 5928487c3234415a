"""Tensor parallelism with sequence parallelism (Megatron-style), applied to the plain model from outside.

Each family's plan (models/<family>/parallelize.py) is built from the pieces here. In every decoder block
and every ViT block, q/k/v and the MLP's first projections are split by output (column-wise, i.e. by heads
and by FFN columns), the attention output and the MLP's last projection by input (row-wise); between them the residual stream and the norms are split along the sequence
(sequence parallel), so activations outside attention and MLP are 1/tp per rank. Entering attention or
the MLP all-gathers the sequence; leaving it reduce-scatters.

The token embedding is split by vocabulary (each rank looks up its rows, one all-reduce), and the
output projection too, so the logits stay split over the vocabulary: the loss is computed on them
without gathering (`loss_parallel`). The vision tower's output is gathered for the projector.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleOutput, loss_parallel
from torch.distributed.tensor.parallel.style import ParallelStyle


def sharded_sequence_in(num_args: int = 1) -> PrepareModuleInput:
    """Gather the sequence into attention / the MLP. The gathered input stays a DTensor, so that the
    column-parallel projections' input gradients add up as one partial sum and leave backward in one
    reduce-scatter (a local tensor would cost an all-reduce per projection)."""
    rest = (None,) * (num_args - 1)
    return PrepareModuleInput(input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest))


def local_input() -> PrepareModuleInput:
    """A layer computed whole on every rank (its weight a plain tensor) takes the gathered input as a local
    tensor; its input gradient, whole on every rank too, joins the projections' partial sums."""
    return PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),),
                              use_local_output=True)


class SumGradient(ParallelStyle):
    """Identity on a module's output, whose gradient is summed over the tp ranks in backward (Megatron's copy into
    the tensor-parallel region): for a value computed whole on every rank and then used by each rank's heads."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        def hook(_module, _inputs, output):
            whole = DTensor.from_local(output, device_mesh, [Replicate()], run_check=False)
            return whole.to_local(grad_placements=[Partial()])

        module.register_forward_hook(hook)
        return module


def scatter_sequence(num_args: int) -> PrepareModuleInput:
    """Full-sequence input (computed on every rank) -> this rank's slice of the sequence."""
    rest = (None,) * (num_args - 1)
    return PrepareModuleInput(input_layouts=(Replicate(), *rest), desired_input_layouts=(Shard(1), *rest),
                              use_local_output=True)


def gather_sequence(use_local_output: bool) -> PrepareModuleOutput:
    return PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(),
                               use_local_output=use_local_output)


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> nn.Module:
    """Parallelize whichever parts of the model this module holds (a pipeline stage may hold only some
    decoder layers) over the 1-D `tp_mesh`, by the plans of the model's families."""
    from mmfm.models import model_spec

    model_spec(model.cfg).apply_tensor_parallel(model, tp_mesh)
    return model


def loss_context(tp: int):
    """Cross-entropy on vocabulary-split logits without gathering them (when tp > 1)."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()
