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


def load_worker(rank: int, world: int, port: int, folder: str, out_dir: str) -> None:
    """The Qwen3-MoE folder loaded into a language model whose experts are split over ep = world ranks (and the
    rest sharded by FSDP over them): each rank's full parameters, gathered."""
    from torch.distributed.tensor import DTensor

    from mmfm.checkpoint.hf import language_config_from_hf, load_language
    from mmfm.config.schema import ModelConfig
    from mmfm.models.spec import part_spec
    from mmfm.parallel.data_parallel import apply_fsdp

    set_local_env(rank, world, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("efsdp", "ep"))
    mesh[("efsdp", "ep")]._flatten("dp_shard")
    cfg = ModelConfig(language=language_config_from_hf(folder))
    with torch.device("meta"):
        lm = part_spec(cfg, "language").build(cfg)
    apply_expert_parallel(lm, mesh["ep"])
    apply_fsdp(lm, mesh["dp_shard"], ("layers",), experts=(mesh["efsdp"], world))
    lm.to_empty(device="cpu")
    lm.init_buffers()
    load_language(lm, folder)
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in lm.named_parameters()}
    local = {n: p.to_local().shape[0] for n, p in lm.named_parameters() if "experts.w" in n}
    torch.save({"params": full, "local_experts": local}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
