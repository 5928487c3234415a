"""The clip family's tower under tensor parallelism (tp=2 on gloo processes), for tests/test_vision_families.py:
a module of its own so that the spawned workers do not import transformers."""

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from mmfm.config import load_config
from mmfm.models import build_model
from mmfm.models.spec import part_spec

TP = 2
# (kind, image size): positions 16 (split along the sequence), 17 (prime: whole), 50 (class token + 49: split)
TP_CASES = [("siglip", 32, True), ("clip", 32, False), ("clip", 56, True)]


def tp_case(kind: str, size: int):
    """A tiny VLM config with a 3-layer tower of this kind (feature layer -2), pixels and an output gradient."""
    cfg = load_config([f"model.vision.kind={kind}", "model.vision.stem=patch", f"model.vision.image_size={size}",
                       "model.vision.patch_size=8", "model.vision.hidden_size=32", "model.vision.num_heads=4",
                       "model.vision.num_layers=3", "model.vision.feature_layer=-2", "model.language.hidden_size=32",
                       "model.language.num_layers=1", "model.language.intermediate_size=64",
                       "model.language.vocab_size=64"]).model
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, size, size, generator=g)
    gout = torch.randn(2, (size // 8) ** 2, 32, generator=g)
    return cfg, x, gout


def tower_run(cfg, x, gout, mesh=None) -> dict:
    """Output and parameter gradients of the (tensor-parallel when mesh) tower, whole."""
    tower = build_model(cfg, seed=0).vision
    if mesh is not None:
        part_spec(cfg, "vision").apply_tensor_parallel(tower, mesh)
    out = tower(x)
    (out * gout).sum().backward()
    split = isinstance(tower.blocks["0"].norm1.weight, DTensor)
    return {"out": out.detach(), "grads": whole_grads(tower), "sequence_split": split}


def whole_grads(module) -> dict:
    """Each parameter's gradient, whole: tensor-parallel shards gathered (sequence-parallel norms' partial sums
    reduced first, to their parameter's placement)."""
    grads = {}
    for name, p in module.named_parameters():
        g = p.grad
        if isinstance(g, DTensor):
            g = g.redistribute(placements=p.placements).full_tensor()
        grads[name] = g
    return grads


def tp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=TP, timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    torch.save([tower_run(*tp_case(kind, size), mesh) for kind, size, _ in TP_CASES], f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
