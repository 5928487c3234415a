"""Training runs on N gloo processes (torch.multiprocessing spawn), for the parallel tests."""

import faulthandler
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from mmfm.config import load_config
from mmfm.models.init import canonical_name
from mmfm.parallel.distributed import free_port, set_local_env
from mmfm.train.trainer import Trainer


def local_full_params(trainer) -> dict:
    """Every parameter this rank's parts hold, unsharded (a collective over each parameter's mesh)."""
    out = {}
    if trainer.engine is not None:  # DeepSpeed: ZeRO's fp32 master weights (gathered under ZeRO-3)
        return {canonical_name(name): trainer.engine.full_weight(p)
                for name, p in trainer.engine.module.named_parameters()}
    for part in trainer.parts.parts:
        for name, p in part.named_parameters():
            out[canonical_name(name)] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    return out


def worker(rank: int, world: int, port: int, overrides: list, run_dir: str, out_dir: str) -> None:
    faulthandler.enable()  # a native crash prints every thread's Python stack to the test's stderr
    set_local_env(rank, world, port)
    torch.set_num_threads(1)
    trainer = Trainer(load_config(overrides), run_dir)
    summary = trainer.fit()
    params = local_full_params(trainer)
    torch.save({"losses": summary["losses"], "grad_norms": summary["grad_norms"], "val_loss": summary["val_loss"],
                "tasks": summary.get("tasks"), "task_predictions": getattr(trainer, "task_predictions", None),
                "engine": trainer.engine.describe() if getattr(trainer, "engine", None) is not None else "native",
                "params": params}, f"{out_dir}/rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # Results are saved and every rank is past the barrier: leave without the interpreter's teardown, where
    # torch's C++ threads have aborted a finished worker ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_layout(world: int, overrides: list, tmp_path) -> dict:
    """Losses and grad norms of rank 0, parameters merged over all ranks (copies must agree)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(parents=True)
    mp.spawn(worker, args=(world, free_port(), overrides, str(tmp_path / "run"), str(out_dir)), nprocs=world, join=True)
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]
    params = {}
    for result in results:
        for name, value in result["params"].items():
            if name in params:  # replicas and the tied embedding's copy on the last stage
                torch.testing.assert_close(value, params[name], rtol=0, atol=1e-6, msg=name)
            params[name] = value
    # the losses are global: every rank reports the same
    assert all(r["losses"] == results[0]["losses"] and r["val_loss"] == results[0]["val_loss"] for r in results)
    return {**results[0], "params": params}


def cli_worker(rank: int, world: int, port: int, argv: list) -> None:
    """`mmfm <argv>` on one of `world` gloo ranks (as torchrun would start it)."""
    faulthandler.enable()
    set_local_env(rank, world, port)
    torch.set_num_threads(1)
    from mmfm.cli.main import main

    code = main(argv)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_cli(world: int, argv: list) -> None:
    """`mmfm <argv>` on `world` gloo processes; raises if any fails."""
    mp.spawn(cli_worker, args=(world, free_port(), [str(a) for a in argv]), nprocs=world, join=True)
