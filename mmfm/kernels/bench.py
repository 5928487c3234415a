"""Kernel benchmark: `mmfm bench kernels` (or `python -m mmfm.kernels.bench`).

On a GPU (`--time`, the default there): for each op at the shapes of a 7B and a 70B Llama-style model,
forward + backward time (median over --iters, CUDA events) and peak memory above the inputs
(torch.cuda.max_memory_allocated) of each implementation:

    kernel    the Triton kernel (mmfm.kernels.*, backend="triton"); attention: flash-attn varlen
    eager     the pure-PyTorch reference
    compiled  torch.compile of the reference
    liger     Liger-Kernel's op, when `liger_kernel` imports
    flex      attention only: compiled FlexAttention with a document mask

Attention runs on --documents packed documents per row (block-diagonal causal). On CPU (`--memory`, the
default there): peak memory of fused linear + cross-entropy loss + backward against the naive path that
materializes the logits, each in a fresh process (peak RSS above the inputs, the kernel's peak count
restarted once they exist, so import-time peaks do not count; grads of hidden and weight are counted in
both). `--full` takes the 8192 tokens x 128256 vocab x 4096 hidden shape.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mmfm.kernels.attention import packed_attention
from mmfm.kernels.dispatch import importable
from mmfm.kernels.fused_linear_cross_entropy import (default_chunk_size, fused_linear_cross_entropy,
                                                     fused_linear_cross_entropy_reference)
from mmfm.kernels.rms_norm import rms_norm, rms_norm_reference
from mmfm.kernels.rotary import apply_rotary, apply_rotary_reference
from mmfm.kernels.swiglu import swiglu, swiglu_reference
from mmfm.models.attention import document_mask
from mmfm.models.ops import rotary_tables

GiB, MiB = 2**30, 2**20
EPS = 1e-5


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    head_dim: int = 128


SHAPES = {
    "7b": ModelShape(hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256),
    "70b": ModelShape(hidden=8192, heads=64, kv_heads=8, ffn=28672, vocab=128256),
    "tiny": ModelShape(hidden=256, heads=4, kv_heads=2, ffn=704, vocab=4096, head_dim=64),  # smoke tests
}
OPS = ("rms_norm", "swiglu", "rotary", "linear_cross_entropy", "attention")
IMPLS = ("kernel", "eager", "compiled", "liger", "flex")


# -- the cases: inputs and one function per implementation --------------------------------------------


def _inputs(op: str, s: ModelShape, tokens: int, dtype, device, documents: int) -> tuple[list, list]:
    """(differentiable inputs, constant inputs) of one op."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_()

    if op == "rms_norm":
        return [randn(tokens, s.hidden), randn(s.hidden)], []
    if op == "swiglu":
        return [randn(tokens, s.ffn), randn(tokens, s.ffn)], []
    if op == "rotary":
        cos, sin = rotary_tables(s.head_dim, tokens, 10000.0, device)
        return [randn(1, s.heads, tokens, s.head_dim), randn(1, s.kv_heads, tokens, s.head_dim)], [cos, sin]
    if op == "linear_cross_entropy":
        targets = torch.randint(0, s.vocab, (tokens,), generator=g, device=device)
        targets[::7] = -100
        return [randn(tokens, s.hidden), randn(s.vocab, s.hidden, scale=s.hidden**-0.5)], [targets]
    if op == "attention":
        doc_ids = (torch.arange(tokens, device=device) * documents // tokens)[None]
        return [randn(1, s.heads, tokens, s.head_dim) for _ in range(3)], [doc_ids]
    raise ValueError(f"unknown op {op!r}; choose from {OPS}")


def _sdpa_documents(q, k, v, doc_ids):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(doc_ids))


def _references() -> dict[str, Callable]:
    return {
        "rms_norm": lambda x, w: rms_norm_reference(x, w, EPS),
        "swiglu": swiglu_reference,
        "rotary": lambda q, k, cos, sin: apply_rotary_reference(q, k, cos, sin),
        "linear_cross_entropy": fused_linear_cross_entropy_reference,
        "attention": _sdpa_documents,
    }


def _kernels() -> dict[str, Callable]:
    return {
        "rms_norm": lambda x, w: rms_norm(x, w, EPS, backend="triton"),
        "swiglu": lambda a, b: swiglu(a, b, backend="triton"),
        "rotary": lambda q, k, cos, sin: apply_rotary(q, k, cos, sin, backend="triton"),
        "linear_cross_entropy": lambda h, w, y: fused_linear_cross_entropy(h, w, y, backend="triton"),
        "attention": lambda q, k, v, d: packed_attention(q, k, v, d, backend="flash"),
    }


def _liger() -> dict[str, Callable]:
    from liger_kernel.transformers import functional as lf

    def rope(q, k, cos, sin):  # Liger takes Hugging Face's [1, T, D] tables (both halves)
        return lf.liger_rope(q, k, torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None])

    return {
        "rms_norm": lambda x, w: lf.liger_rms_norm(x, w, EPS),
        "swiglu": lf.liger_swiglu,
        "rotary": rope,
        "linear_cross_entropy": lambda h, w, y: lf.liger_fused_linear_cross_entropy(h, w, y),
    }


def implementation(op: str, impl: str) -> Optional[Callable]:
    """The function of `impl` for `op`, or None where it does not exist here."""
    if impl == "eager":
        return _references()[op]
    if impl == "compiled":
        return None if op == "attention" else torch.compile(_references()[op])
    if impl == "kernel":
        if op == "attention" and not importable("flash_attn"):
            return None
        return _kernels()[op] if importable("triton") else None
    if impl == "liger":
        return _liger().get(op) if importable("liger_kernel") else None
    if impl == "flex":
        return (lambda q, k, v, d: packed_attention(q, k, v, d, backend="flex")) if op == "attention" else None
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


# -- timing ------------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor)][:2]  # Liger's loss may come with extras


def measure(fn: Callable, grads: list, consts: list, iters: int, warmup: int) -> tuple[float, Optional[float]]:
    """Median forward + backward milliseconds and peak bytes above the inputs (None on CPU)."""
    device = grads[0].device
    times, peak = [], None
    seeds = None
    for i in range(warmup + iters):
        for t in grads:
            t.grad = None
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        outs = _outputs(fn(*grads, *consts))
        if seeds is None:
            seeds = [torch.ones_like(o) for o in outs]
        torch.autograd.backward(outs, seeds)
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
            if device.type == "cuda":
                peak = max(peak or 0, torch.cuda.max_memory_allocated() - base)
        del outs
    return statistics.median(times), peak


def time_table(shapes: list[str], ops: list[str], impls: list[str], tokens: int, dtype, device,
               iters: int, warmup: int, documents: int) -> list[dict]:
    rows = []
    for shape in shapes:
        for op in ops:
            grads, consts = _inputs(op, SHAPES[shape], tokens, dtype, device, documents)
            for impl in impls:
                row = {"shape": shape, "op": op, "impl": impl, "ms": None, "peak_mib": None, "note": ""}
                fn = implementation(op, impl)
                if fn is None:
                    continue
                try:
                    ms, peak = measure(fn, grads, consts, iters, warmup)
                    row.update(ms=ms, peak_mib=None if peak is None else peak / MiB)
                except Exception as exc:  # noqa: BLE001 - a failing third-party op is reported, not fatal
                    row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
                rows.append(row)
            del grads, consts
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def format_time_table(rows: list[dict]) -> str:
    out = [f"{'shape':5s} {'op':22s} {'impl':9s} {'ms (median)':>12s} {'peak MiB':>10s} {'vs eager':>9s}  note"]
    eager = {(r["shape"], r["op"]): r for r in rows if r["impl"] == "eager"}
    for r in rows:
        ref = eager.get((r["shape"], r["op"]))
        speedup = f"{ref['ms'] / r['ms']:8.2f}x" if r["ms"] and ref and ref["ms"] else f"{'':9s}"
        ms = f"{r['ms']:12.3f}" if r["ms"] is not None else f"{'-':>12s}"
        mem = f"{r['peak_mib']:10.1f}" if r["peak_mib"] is not None else f"{'-':>10s}"
        out.append(f"{r['shape']:5s} {r['op']:22s} {r['impl']:9s} {ms} {mem} {speedup}  {r['note']}")
    return "\n".join(out)


# -- fused linear + cross-entropy memory, one process per variant (CPU or GPU) ------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS count (VmHWM) from now: an earlier peak (imports) must not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_worker(variant: str, tokens: int, vocab: int, hidden: int, chunk_size: Optional[int], device: str) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    # In-place init: no temporaries, so the RSS high-water mark before the run is the inputs themselves.
    hidden_states = torch.randn(tokens, hidden, device=dev).requires_grad_()
    weight = torch.randn(vocab, hidden, device=dev).mul_(hidden**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=dev)
    targets[::7] = -100
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss_bytes()
    start = time.perf_counter()
    if variant == "naive":
        loss = fused_linear_cross_entropy_reference(hidden_states, weight, targets)
    else:
        loss = fused_linear_cross_entropy(hidden_states, weight, targets, chunk_size=chunk_size)
    loss.backward()
    _sync(dev)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss_bytes()
    return {"peak": peak - base, "loss": loss.item(), "seconds": time.perf_counter() - start}


def memory_comparison(tokens: int, vocab: int, hidden: int, chunk_size: Optional[int], device: str,
                      skip_naive: bool = False, repeats: int = 3) -> tuple[str, dict]:
    """The printed comparison and the measured figures per variant: the median over `repeats` fresh
    processes."""
    n, v, h = tokens, vocab, hidden
    chunk = chunk_size or default_chunk_size(n, h, v)
    common = (v * h + n * h) * 4  # grads of weight and hidden, fp32
    analytic = {"naive": 2 * n * v * 4 + common, "chunked": chunk * v * 4 + common}  # logits + grad vs one chunk
    lines = [f"fused linear + cross-entropy, loss + backward: N={n} tokens, V={v} vocab, H={h} hidden, fp32, "
             f"device={device}; chunk={chunk} tokens ({chunk * v * 4 / MiB:.1f} MiB of logits)"]
    results = {}
    for variant in ("naive", "chunked"):
        if variant == "naive" and skip_naive:
            continue
        cmd = [sys.executable, "-m", "mmfm.kernels.bench", "--memory-worker", variant, f"--tokens={n}",
               f"--vocab={v}", f"--hidden={h}", f"--device={device}"] + ([f"--chunk-size={chunk_size}"] if chunk_size else [])
        runs = []
        for _ in range(repeats):
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{variant} worker failed: {out.stderr.strip().splitlines()[-1:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[variant] = r = {**runs[0], "peak": statistics.median(x["peak"] for x in runs),
                                "seconds": statistics.median(x["seconds"] for x in runs)}
        peaks = ", ".join(f"{x['peak'] / GiB:.3f}" for x in runs)
        lines.append(f"{variant:8s} peak {r['peak'] / GiB:7.3f} GiB  (analytic >= {analytic[variant] / GiB:.3f} GiB)"
                     f"  loss {r['loss']:.6f}  {r['seconds']:.1f} s  (median of {repeats} processes: {peaks})")
    lines.append(f"analytic ratio: {analytic['naive'] / analytic['chunked']:.2f}x with grads of weight/hidden counted in "
                 f"both ({2 * n / chunk:.1f}x for the logits alone)")
    if len(results) == 2:
        lines.append(f"measured ratio: {results['naive']['peak'] / results['chunked']['peak']:.2f}x")
    return "\n".join(lines), results


# -- command line -----------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--time", action="store_true", help="time + peak memory table (default on a GPU)")
    p.add_argument("--memory", action="store_true", help="fused linear CE memory comparison (default on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--shapes", nargs="+", default=["7b", "70b"], choices=sorted(SHAPES))
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="time table dtype (default bf16)")
    p.add_argument("--iters", type=int, default=10, help="measured iterations (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations, compilation included (default 3)")
    p.add_argument("--documents", type=int, default=4, help="packed documents per row for attention (default 4)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per op (default: 8192 for --time, 2048 for --memory)")
    p.add_argument("--vocab", type=int, default=32768, help="--memory vocabulary (default 32768)")
    p.add_argument("--hidden", type=int, default=1024, help="--memory hidden size (default 1024)")
    p.add_argument("--full", action="store_true", help="--memory at 8192 tokens x 128256 vocab x 4096 hidden")
    p.add_argument("--chunk-size", type=int, default=None, help="--memory tokens per chunk (default: the library's)")
    p.add_argument("--skip-naive", action="store_true", help="--memory without the naive path (when it cannot fit)")
    p.add_argument("--repeats", type=int, default=3, help="--memory processes per variant, median taken (default 3)")
    p.add_argument("--memory-worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.tokens, args.vocab, args.hidden, args.chunk_size,
                                       device)))
        return 0
    do_time = args.time or (not args.memory and device == "cuda")
    do_memory = args.memory or not do_time
    if do_time:
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        tokens = args.tokens or 8192
        print(f"forward + backward per op: {tokens} tokens, {args.dtype}, {device}"
              f"{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}; median of {args.iters} "
              f"after {args.warmup} warm-up; peak memory above the inputs")
        rows = time_table(args.shapes, args.ops, args.impls, tokens, dtype, torch.device(device), args.iters,
                          args.warmup, args.documents)
        print(format_time_table(rows))
    if do_memory:
        if args.full:
            args.tokens, args.vocab, args.hidden = 8192, 128256, 4096
        text, _ = memory_comparison(args.tokens or 2048, args.vocab, args.hidden, args.chunk_size, device,
                                    args.skip_naive, args.repeats)
        print(text)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmfm.kernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
