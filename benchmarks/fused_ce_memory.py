"""Peak memory of LM-head loss + backward: naive (materialized [N, V] logits) vs chunked fused linear CE.

    python benchmarks/fused_ce_memory.py                      # 2048 tokens x 32768 vocab x 1024 hidden, fp32
    python benchmarks/fused_ce_memory.py --full               # the issue's 8192 x 128256 x 4096 (needs RAM)
    python benchmarks/fused_ce_memory.py --tokens 4096 --chunk-size 128

Each variant runs in a fresh subprocess; on CPU its figure is the peak RSS (ru_maxrss) during loss + backward
minus the RSS once the inputs exist, so inputs are excluded and the grads (hidden, weight) are included in
both. The chunked variant uses `fused_linear_cross_entropy` (torch backend on CPU, Triton on CUDA, where
the figure is torch.cuda's peak allocation instead).
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from mmfm.kernels.fused_linear_cross_entropy import (
    default_chunk_size, fused_linear_cross_entropy, fused_linear_cross_entropy_reference)

GiB = 2**30


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _worker(a) -> dict:
    dev = torch.device(a.device)
    torch.manual_seed(0)
    # In-place init: no temporaries, so the RSS high-water mark before the run is the inputs themselves.
    hidden = torch.randn(a.tokens, a.hidden, device=dev).requires_grad_()
    weight = torch.randn(a.vocab, a.hidden, device=dev).mul_(a.hidden**-0.5).requires_grad_()
    targets = torch.randint(0, a.vocab, (a.tokens,), device=dev)
    targets[::7] = -100
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t = time.perf_counter()
    if a.worker == "naive":
        loss = fused_linear_cross_entropy_reference(hidden, weight, targets)
    else:
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=a.chunk_size)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak": peak - base, "loss": loss.item(), "seconds": time.perf_counter() - t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--full", action="store_true", help="8192 tokens x 128256 vocab x 4096 hidden")
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the library's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-naive", action="store_true", help="when the naive path does not fit in memory")
    p.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.full:
        a.tokens, a.vocab, a.hidden = 8192, 128256, 4096
    if a.worker:
        print(json.dumps(_worker(a)))
        return

    N, V, H = a.tokens, a.vocab, a.hidden
    chunk = a.chunk_size or default_chunk_size(N, H, V)
    common = (V * H + N * H) * 4  # grads of weight and hidden, fp32
    naive_an, chunked_an = 2 * N * V * 4 + common, chunk * V * 4 + common  # logits + their grad vs one chunk
    print(f"N={N} tokens, V={V} vocab, H={H} hidden, fp32, device={a.device}; chunk={chunk} tokens "
          f"({chunk * V * 4 / 2**20:.1f} MiB of logits)")
    args = [sys.executable, __file__, f"--tokens={N}", f"--vocab={V}", f"--hidden={H}", f"--device={a.device}"]
    if a.chunk_size:
        args.append(f"--chunk-size={a.chunk_size}")
    res = {}
    for variant in ["naive", "chunked"]:
        if variant == "naive" and a.skip_naive:
            continue
        out = subprocess.run(args + [f"--worker={variant}"], capture_output=True, text=True, check=True)
        res[variant] = r = json.loads(out.stdout.strip().splitlines()[-1])
        an = naive_an if variant == "naive" else chunked_an
        print(f"{variant:8s} peak {r['peak'] / GiB:7.3f} GiB  (analytic >= {an / GiB:.3f} GiB)  "
              f"loss {r['loss']:.6f}  {r['seconds']:.1f} s")
    print(f"analytic ratio: {naive_an / chunked_an:.2f}x with grads of weight/hidden counted in both "
          f"({2 * N / chunk:.1f}x for the logits alone: 2*N*V*4 / (chunk*V*4))")
    if "naive" in res:
        print(f"measured ratio: {res['naive']['peak'] / res['chunked']['peak']:.2f}x")


if __name__ == "__main__":
    main()
