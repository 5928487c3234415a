"""FSDP2 checkpoints: exact resume at the same layout, and resume at another data-parallel size.
(The layouts' equivalence with one process is in test_parallel_equivalence.py.)"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from conftest import SMALL_MODEL, STEPS, free_port
from mmfm.config import load_config
from mmfm.train.trainer import Trainer



def full_params(model) -> dict:
    """Unsharded parameters by name (without the activation-checkpoint wrapper's name prefix)."""
    return {n.replace("_checkpoint_wrapped_module.", ""): (p.full_tensor() if isinstance(p, DTensor) else p).detach()
            for n, p in model.named_parameters()}


def worker(rank: int, world: int, port: int, overrides: list, run_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(load_config(overrides), run_dir)
    summary = trainer.fit()
    params = full_params(trainer.model)
    if rank == 0:
        torch.save({"losses": summary["losses"], "grad_norms": summary["grad_norms"], "params": params}, out)
    dist.destroy_process_group()


def run_parallel(world: int, overrides: list, tmp_path) -> dict:
    out = str(tmp_path / "result.pt")
    mp.spawn(worker, args=(world, free_port(), overrides, str(tmp_path / "run"), out), nprocs=world, join=True)
    return torch.load(out, weights_only=True)


def test_fsdp_resume_from_sharded_checkpoint_is_exact(synth_dir, tmp_path):
    base = [f"data.path={synth_dir}", *SMALL_MODEL, *STEPS, "parallel=fsdp2", "data.batch_size=4",
            "train.max_steps=5", "checkpoint.every=2", "checkpoint.keep_last=3"]
    straight = run_parallel(2, base, tmp_path / "straight")
    resumed = run_parallel(2, base + [f"checkpoint.resume={tmp_path}/straight/run/checkpoints/step_00000002"],
                           tmp_path / "resumed")
    assert sorted(resumed["losses"]) == [3, 4, 5]
    assert all(resumed["losses"][s] == straight["losses"][s] for s in (3, 4, 5))  # bitwise
    for name, value in straight["params"].items():
        assert torch.equal(resumed["params"][name], value), name
    # at another data-parallel size: model and optimizer reshard, the loader positions too
    one_process = [f"data.path={synth_dir}", *SMALL_MODEL, *STEPS, "train.max_steps=5", "data.batch_size=8",
                   f"checkpoint.resume={tmp_path}/straight/run/checkpoints/step_00000004"]
    summary = Trainer(load_config(one_process), tmp_path / "one").fit()
    assert summary["losses"][5] == pytest.approx(straight["losses"][5], rel=1e-5)
