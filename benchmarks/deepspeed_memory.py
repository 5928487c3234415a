"""Per-rank memory of the model states under DeepSpeed ZeRO-1/2/3 (with and without offload), against the ZeRO
paper's accounting (Rajbhandari et al. 2020): of Psi parameters, each rank holds

    ZeRO-1: (p + g) * Psi + K * Psi / N      ZeRO-2: p * Psi + (g + K) * Psi / N      ZeRO-3: (p + g + K) * Psi / N

bytes, p and g the bytes per parameter of the weights and gradients the model computes with, K of what the optimizer
keeps (fp32 master weights + AdamW's two moments: 12). The paper's mixed precision is p = g = 2 (bf16 here); in fp32,
p = g = 4.

    torchrun --nproc_per_node=N benchmarks/deepspeed_memory.py [--stage 3] [--offload cpu] [--precision bf16]
    python benchmarks/deepspeed_memory.py --spawn 2 [...]       # N gloo processes on this machine (CPU)

Each rank builds a decoder of about 100M parameters (mmfm's Llama-style blocks; `--hidden`, `--layers`), wraps it in
mmfm's DeepSpeed runner (mmfm.train.deepspeed_engine) and trains 3 steps on random tokens. Measured, rank 0 prints:

- `device`: on CUDA the peak of torch.cuda.max_memory_allocated (weights, gradients, optimizer state, activations and
  DeepSpeed's buffers on the GPU); on CPU, where offload moves nothing off the device, the bytes of every tensor the
  engine holds after each backward (before the optimizer step): every tensor reachable from the DeepSpeed engine and
  its ZeRO optimizer (weights, gradients, master weights, AdamW's moments, DeepSpeed's buffers; the activations are
  freed), each storage once, the largest of the 3 steps.
- `model states (paper)`: the formula above for this stage, N and precision.
Rows of a sweep are the runs of `benchmarks/deepspeed_memory.py --sweep` (every stage, and stage 3 with offload).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, also without pip install
from mmfm.config import load_config  # noqa: E402
from mmfm.models import build_model  # noqa: E402
from mmfm.parallel.distributed import free_port, set_local_env  # noqa: E402
from mmfm.train.deepspeed_engine import DeepSpeedRunner  # noqa: E402

GiB = 2**30


def held_tensor_bytes(*roots) -> int:
    """Bytes of every tensor storage reachable from roots (through attributes, lists, tuples, dicts, a tensor's .grad
    and ZeRO-3's .ds_tensor), each storage once: what the engine holds, activations aside."""
    seen_objects, storages, total = set(), set(), 0
    stack = [(root, 0) for root in roots]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen_objects or depth > 12:
            continue
        seen_objects.add(id(obj))
        if torch.is_tensor(obj):
            try:
                storage = obj.untyped_storage()
                key = (storage.device.type, storage.data_ptr())
                if storage.data_ptr() and key not in storages:
                    storages.add(key)
                    total += storage.nbytes()
            except Exception:  # noqa: BLE001 - meta tensors, subclasses without storage
                pass
            stack += [(getattr(obj, name), depth + 1) for name in ("grad", "ds_tensor") if getattr(obj, name, None)
                      is not None]
            continue
        if isinstance(obj, dict):
            stack += [(v, depth + 1) for v in obj.values()]
        elif isinstance(obj, (list, tuple, set)):
            stack += [(v, depth + 1) for v in obj]
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack += [(v, depth + 1) for v in vars(obj).values()]
    return total


def paper_bytes(stage: int, params: int, world: int, precision: str) -> float:
    p = g = 2 if precision == "bf16" else 4
    k = 12
    return {0: (p + g + k) * params, 1: (p + g) * params + k * params / world,
            2: p * params + (g + k) * params / world, 3: (p + g + k) * params / world}[stage]


def run(args) -> dict:
    buckets = Path(args.out_dir) / "buckets.json"  # DeepSpeed's communication buffers, small beside the model
    buckets.write_text(json.dumps({"zero_optimization": {
        "reduce_bucket_size": args.bucket, "allgather_bucket_size": args.bucket,
        "stage3_prefetch_bucket_size": args.bucket, "stage3_max_live_parameters": args.bucket,
        "stage3_max_reuse_distance": args.bucket, "stage3_param_persistence_threshold": 0}}))
    cfg = load_config(["engine.name=deepspeed", f"engine.deepspeed.config={buckets}", f"engine.deepspeed.zero_stage={args.stage}",
                       f"engine.deepspeed.offload_optimizer={args.offload}",
                       f"engine.deepspeed.offload_param={args.offload if args.stage == 3 else 'none'}",
                       f"data.batch_size={args.batch}", f"train.precision={args.precision}", "train.grad_accum_steps=1"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    shape = [f"model.language.{k}={v}" for k, v in dict(
        vocab_size=32000, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
        num_kv_heads=args.hidden // 64, intermediate_size=args.hidden * 8 // 3 // 64 * 64, max_seq_len=args.seq,
        tie_embeddings=False).items()]
    model = build_model(load_config(shape).model, device, seed=0).language  # the decoder of a VLM of this size
    lm = model.cfg
    params = sum(p.numel() for p in model.parameters())
    runner = DeepSpeedRunner(cfg, model, device)
    measured = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        tokens = torch.randint(0, lm.vocab_size, (args.batch, args.seq), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits = runner.engine(runner.engine.embed(tokens))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        runner.backward(loss)
        del logits, loss
        if device.type != "cuda":
            measured = max(measured, held_tensor_bytes(runner.engine, runner.optimizer))
        runner.step()
    if device.type == "cuda":
        measured = torch.cuda.max_memory_allocated(device)
    world = dist.get_world_size()
    gathered = [None] * world
    dist.all_gather_object(gathered, measured)
    return {"stage": args.stage, "offload": args.offload, "precision": args.precision, "ranks": world,
            "params": params, "engine": runner.describe(), "device": device.type,
            "measured_gib_per_rank": [round(m / GiB, 3) for m in gathered],
            "paper_model_states_gib": round(paper_bytes(args.stage, params, world, args.precision) / GiB, 3)}


def spawned(rank: int, world: int, port: int, args) -> None:
    set_local_env(rank, world, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = run(args)
    if rank == 0:
        print(json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, default=3, choices=(0, 1, 2, 3))
    parser.add_argument("--offload", default="none", choices=("none", "cpu"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--bucket", type=int, default=2**20, help="DeepSpeed's bucket sizes (elements)")
    parser.add_argument("--out-dir", default="/tmp", help="where the bucket settings' JSON is written")
    parser.add_argument("--spawn", type=int, default=0, help="start this many gloo processes here (CPU)")
    parser.add_argument("--sweep", action="store_true", help="ZeRO-1, 2, 3 and 3 with CPU offload, one after another")
    args = parser.parse_args()
    settings = [(1, "none"), (2, "none"), (3, "none"), (3, "cpu")] if args.sweep else [(args.stage, args.offload)]
    for stage, offload in settings:
        args.stage, args.offload = stage, offload
        if args.spawn:
            torch.multiprocessing.spawn(spawned, args=(args.spawn, free_port(), args), nprocs=args.spawn, join=True)
        else:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            result = run(args)
            if dist.get_rank() == 0:
                print(json.dumps(result), flush=True)
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
