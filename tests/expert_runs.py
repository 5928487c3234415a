"""One mixture-of-experts layer on 2 gloo processes with expert parallelism (torch.multiprocessing spawn), for
tests/test_moe.py: its output and input gradient against the layer on one process, and its all-to-all bytes."""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from mmfm.parallel.comm import CommCounter
from mmfm.parallel.distributed import set_local_env
from mmfm.parallel.expert_parallel import apply_expert_parallel


def worker(rank: int, world: int, port: int, make_layer, inputs: list, out_dir: str) -> None:
    set_local_env(rank, world, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    layer = nn.Sequential(make_layer())
    apply_expert_parallel(layer, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))
    x = inputs[rank].clone().requires_grad_(True)
    with CommCounter() as counter:
        out = layer(x)
        out.square().sum().backward()
    torch.save({"out": out.detach(), "grad": x.grad, "all_to_all": counter.bytes_by_kind().get("all_to_all", 0)},
               f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
