"""Training-step time and MFU of a Llama-style language model on one GPU, next to the planner's prediction.

    python benchmarks/gpu_train_mfu.py [--steps 10] [--batch 8] [--seq 2048] [--tiny]

Each implementation (`kernels=torch`: the model's PyTorch ops and SDPA; `kernels=auto`: mmfm's Triton kernels on
CUDA) builds the same 0.9B model (hidden 2048, 16 layers, 16 heads / 8 KV heads, SwiGLU 5632, vocabulary 32,000,
untied), trains it with fp32 master weights under bf16 autocast and fused AdamW on random tokens, and reports the
median step time over `--steps` timed steps (after 3 warm-up steps), tokens/s, MFU against the hardware's dense
bf16 peak (the FLOPs the planner counts: mmfm.models.spec training_flops) and peak memory. The planner's prediction
(mmfm.plan.search.evaluate, hardware=h200) for the same job is printed beside them: measured MFU / planned MFU
is the `achievable` fraction a hardware file should hold. `--tiny` runs a small model on CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, also without pip install
from mmfm.config import load_config  # noqa: E402
from mmfm.kernels.apply import apply_kernels, resolve_kernels  # noqa: E402
from mmfm.models import build_model, model_spec  # noqa: E402
from mmfm.plan.search import Layout, Workload, evaluate  # noqa: E402

MODEL_1B = ["model.language.hidden_size=2048", "model.language.num_layers=16", "model.language.num_heads=16",
            "model.language.num_kv_heads=8", "model.language.intermediate_size=5632",
            "model.language.vocab_size=32000", "model.language.tie_embeddings=false"]
MODEL_TINY = ["model.language.hidden_size=64", "model.language.num_layers=2", "model.language.num_heads=4",
              "model.language.num_kv_heads=2", "model.language.intermediate_size=176",
              "model.language.vocab_size=256", "model.language.tie_embeddings=false"]


def config(impl: str, tiny: bool, seq: int):
    return load_config(["model=gpt", "model.language.kind=llama", *(MODEL_TINY if tiny else MODEL_1B),
                        f"model.language.max_seq_len={seq}", f"kernels={impl}", "hardware=h200"])


def timed_steps(cfg, device: torch.device, batch: int, seq: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg.model, device)
    choices = resolve_kernels(cfg.kernels, device)
    swapped = apply_kernels(model, choices)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    vocab = cfg.model.language.vocab_size
    ids = torch.randint(vocab, (batch, seq + 1), device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    times = []
    for step in range(3 + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(inputs, targets=targets) / targets.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"choices": choices, "swapped": swapped, "step_s": statistics.median(times), "loss": loss.item(),
            "peak_gib": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    rows = []
    for impl in ("torch", "auto"):
        cfg = config(impl, args.tiny, args.seq)
        spec = model_spec(cfg.model)
        flops = spec.training_flops(cfg.model, args.batch * args.seq, args.seq, 0)
        plan = evaluate(cfg, Layout(micro_batch=args.batch), Workload(1, args.batch, args.seq, 0))
        got = timed_steps(cfg, device, args.batch, args.seq, args.steps)
        mfu = flops / got["step_s"] / cfg.hardware.peak_bf16_flops
        rows.append({"kernels": impl, "params": spec.num_params(cfg.model), **got,
                     "tokens_per_s": args.batch * args.seq / got["step_s"], "mfu": mfu,
                     "planned_step_s": plan.time["step"], "planned_mfu": plan.mfu,
                     "planned_gib": plan.memory["total"] / 2**30})
        r = rows[-1]
        print(f"kernels={impl:5s} {r['params'] / 1e9:.2f}B  step {r['step_s'] * 1e3:8.1f} ms  "
              f"{r['tokens_per_s']:9.0f} tok/s  MFU {mfu:6.1%}  peak {r['peak_gib']:6.1f} GiB  | planned "
              f"{r['planned_step_s'] * 1e3:8.1f} ms, MFU {plan.mfu:6.1%}, {r['planned_gib']:6.1f} GiB  "
              f"loss {r['loss']:.3f}  {got['choices']}", flush=True)
        del got
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
