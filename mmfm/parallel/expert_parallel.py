"""Expert parallelism, applied from outside: each mixture-of-experts layer's experts split over the `ep` mesh dim,
tokens sent to the rank holding their expert and back by all-to-all with variable split sizes.

The ep ranks are data-parallel ranks (ep divides dp_shard): each routes its own tokens over all experts, as on one
process. The layer's GroupedExperts then gets, through a forward pre-hook, the tokens every ep peer routed to this
rank's experts (sorted by local expert) and, through a forward hook, sends each result back to the rank and row it
came from. The weights become DTensors sharded on the expert dim; the router and shared experts stay replicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.distributed.tensor import Shard, distribute_tensor

from mmfm.models.moe import GroupedExperts


def expert_modules(model: nn.Module) -> list[GroupedExperts]:
    return [m for m in model.modules() if isinstance(m, GroupedExperts)]


def local_expert_order(received: torch.Tensor) -> torch.Tensor:
    """received [P, L]: rows from each of P ranks, by local expert, laid out rank-major. The permutation that lays
    them out expert-major (all of local expert 0's rows, from rank 0 up, then expert 1's ...)."""
    sizes = received.flatten()
    starts = torch.cumsum(sizes, 0) - sizes
    chunks = torch.arange(sizes.numel(), device=sizes.device).view(received.shape).t().flatten()
    sizes, starts = sizes[chunks], starts[chunks]
    out_starts = torch.cumsum(sizes, 0) - sizes
    return torch.arange(int(sizes.sum()), device=sizes.device) + torch.repeat_interleave(starts - out_starts, sizes)


class ExpertDispatch:
    """The hooks of one GroupedExperts module over an ep process group."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.state: tuple = ()

    def dispatch(self, module: nn.Module, args: tuple) -> tuple:
        """(x [M, D] sorted by global expert, counts [E]) -> (the rows of this rank's experts, their counts [L])."""
        x, counts = args
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)
        received = received.view(self.size, -1)
        send = counts.view(self.size, -1).sum(1).tolist()
        recv = received.sum(1).tolist()
        rows = dist_fn.all_to_all_single(x.new_empty(sum(recv), x.shape[1]), x, recv, send, group=self.group)
        order = local_expert_order(received)
        self.state = (order, send, recv)
        return rows[order], received.sum(0)

    def combine(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """This rank's expert outputs -> the rows it routed, in their order."""
        order, send, recv = self.state
        self.state = ()
        by_rank = torch.empty_like(out).index_copy(0, order, out)
        return dist_fn.all_to_all_single(out.new_empty(sum(send), out.shape[1]), by_rank, send, recv,
                                         group=self.group)


def apply_expert_parallel(model: nn.Module, ep_mesh) -> int:
    """Shard every GroupedExperts' weights over ep_mesh (dim 0, the expert) and hook its dispatch; return how many."""
    modules = expert_modules(model)
    for experts in modules:
        for name, param in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)])
            experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        hooks = ExpertDispatch(ep_mesh.get_group())
        experts.register_forward_pre_hook(hooks.dispatch)
        experts.register_forward_hook(hooks.combine)
    return len(modules)
