"""Data parallelism (FSDP2 / HSDP) on gloo processes against one process: same seed, same samples.

Tolerance (fp32): losses within rtol 1e-5, parameters after 3 AdamW steps within atol 1e-4. The
processes sum gradients in another order (reduce-scatter over ranks) and pad their micro-batches to
their own longest sample, so results agree to rounding, not bit for bit; Adam's first steps move each
weight by about lr * sign(gradient), so a gradient entry near zero can flip by up to lr=1e-3 * 0.1.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from conftest import SMALL_MODEL
from mmfm.checkpoint import CheckpointError
from mmfm.config import load_config
from mmfm.train.trainer import Trainer

STEPS = ["train.max_steps=3", "train.schedule.warmup_steps=1", "train.grad_accum_steps=2", "eval.num_samples=0",
         "logger.wandb.enabled=false", "logger.progress_bar=false", "train.val_every=0", "checkpoint.every=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.mark.parametrize("parallel,world,extra", [("fsdp2", 2, []), ("hsdp2x2", 4, []),
                                                  ("fsdp2", 2, ["train.activation_checkpoint=full"])],
                         ids=["fsdp2", "hsdp2x2", "fsdp2+full-ac"])
def test_data_parallel_matches_one_process(synth_dir, tmp_path, parallel, world, extra):
    base = [f"data.path={synth_dir}", *SMALL_MODEL, *STEPS]
    local_batch = 4
    got = run_parallel(world, base + [f"parallel={parallel}", f"data.batch_size={local_batch}", *extra],
                       tmp_path / "dp")
    single = Trainer(load_config(base + [f"data.batch_size={local_batch * world}"]), tmp_path / "single")
    summary = single.fit()
    want = full_params(single.model)
    assert sorted(got["losses"]) == [1, 2, 3]
    for step, loss in summary["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=1e-5)
        assert got["grad_norms"][step] == pytest.approx(summary["grad_norms"][step], rel=1e-4)
    assert got["losses"][3] < got["losses"][1]
    assert got["params"].keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-4, msg=name)
    assert (tmp_path / "dp/run/checkpoints/step_00000003/.metadata").is_file()


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
    one_process = [f"data.path={synth_dir}", *SMALL_MODEL, *STEPS, "data.batch_size=8",
                   f"checkpoint.resume={tmp_path}/straight/run/checkpoints/step_00000004"]
    with pytest.raises(CheckpointError, match="holds data-loader positions for 2 data-parallel ranks, this job has 1"):
        Trainer(load_config(one_process), tmp_path / "one").fit()
