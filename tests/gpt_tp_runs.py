"""The gpt family under tensor parallelism (tp=2 on gloo processes), for tests/test_gpt.py: the logits and the
parameter gradients of a tiny model, to compare with one process."""

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from mmfm.config import load_config
from mmfm.models import build_model, model_spec
from vision_tp_runs import whole_grads

TP = 2
TINY = ["model=gpt", "model.language.vocab_size=96", "model.language.hidden_size=32", "model.language.num_heads=4",
        "model.language.num_layers=2", "model.language.max_seq_len=16"]


def gpt_run(mesh=None) -> dict:
    """Logits (whole) and parameter gradients (whole) of the tiny gpt, tensor-parallel when mesh is given."""
    cfg = load_config(TINY).model
    g = torch.Generator().manual_seed(1)
    ids, gout = torch.randint(0, 96, (2, 16), generator=g), torch.randn(2, 16, 96, generator=g)
    model = build_model(cfg, seed=0)
    if mesh is not None:
        model_spec(cfg).apply_tensor_parallel(model, mesh)
    logits = model(ids)
    logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
    (logits * gout).sum().backward()
    return {"logits": logits.detach(), "grads": whole_grads(model)}


def tp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=TP, timeout=datetime.timedelta(seconds=60))
    torch.save(gpt_run(init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))), f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
