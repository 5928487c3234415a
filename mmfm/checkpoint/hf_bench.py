"""Memory of a Hugging Face import: `mmfm bench hf-load` (or `python benchmarks/hf_load.py`).

Shows that no rank holds the full model while `load_language` fills a sharded language model, as
mmfm/checkpoint/hf.py promises (each rank reads only its slice of each tensor).

1. A kind=llama checkpoint of the requested size is written by mmfm itself (no transformers): the model is
   built on the meta device, materialized, filled with seeded uniform values and written by
   `export_language` as safetensors shards with an index (fp32, or bf16 with --checkpoint-dtype). The
   writer's model is freed before anything is measured. --dir keeps the folder (and reuses one written for
   the same shape and dtype).
2. For each layout (tp=N, fsdp=N) N fresh gloo processes (fresh per layout, so that memory one layout freed
   cannot hide in the next one's baseline) each build the model on meta, shard it, `to_empty(device="cpu")`,
   then measure around `load_language(lm, folder)` (the model is fp32):

   baseline   RssAnon (/proc/self/status) after to_empty; the parameters' pages are reserved but not yet
              touched, so the load's increase includes the rank's own shard
   peak       the largest RssAnon seen during the load, sampled every 2 ms by a background thread (and
              once at the end); peak - baseline is what the load cost the rank: the pages of its shard
              (reserved by to_empty, touched by the copy), a converted copy of each slice when the
              checkpoint's dtype differs from the model's (bf16), allocator slack. (safetensors 0.8 returns
              a slice as a view of the mapped file: no private copy of it when the dtypes match, fp32.)
   VmHWM      ru_maxrss, for completeness: the process's whole high-water mark, every mapped file page
              included (torch's shared libraries, ~180 MiB, and the safetensors pages the rank read)

Why anonymous memory only: safetensors reads the files through mmap, and every page of a file the rank read
is then resident in its address space, counted in VmRSS / VmHWM / ru_maxrss (as RssFile), although it is the
kernel's page cache, shared by all processes mapping the file, and dropped under memory pressure without any
write-back: a tp rank reading a column slice touches the pages of every row, so its VmHWM approaches the
checkpoint's size while it holds only its shard. RssAnon is the memory private to the process: what it
holds. (The flip side: this measures private copies only; safetensors' views cost none, so a loader that
mapped the whole checkpoint without copying it would not show up here either.)

The sampler is a Python thread, so it runs when the loading thread releases the GIL (torch's copy_ into the
shard does; the switch interval is lowered to 0.5 ms during the load); a peak shorter than that can go unseen.
The verdict compares the largest peak increase over all ranks with the full model's bytes.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import resource
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from mmfm.checkpoint.hf import (HFCheckpointError, export_language, language_config_from_hf, language_mismatches,
                                load_language, read_hf_config)
from mmfm.config.schema import LanguageConfig, ModelConfig
from mmfm.errors import ConfigError
from mmfm.models.spec import part_spec
from mmfm.parallel.data_parallel import apply_fsdp
from mmfm.parallel.distributed import free_port, set_local_env

LAYOUTS = ("tp", "fsdp")
SAMPLE_S = 0.002
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MiB = 2**20


# ---------------------------------------------------------------- the model and its checkpoint


def language_config(hidden: int = 1024, layers: int = 24, vocab: int = 32000, intermediate: int = 0,
                    heads: int = 16, kv_heads: int = 4) -> LanguageConfig:
    """An untied kind=llama model; intermediate 0: 11/4 of hidden (2816 at 1024, Llama's SwiGLU ratio)."""
    return LanguageConfig(kind="llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                          num_kv_heads=kv_heads, intermediate_size=intermediate or hidden * 11 // 4,
                          max_seq_len=256, tie_embeddings=False)


def _spec(cfg: LanguageConfig):
    return part_spec(ModelConfig(language=cfg), "language")


def check(cfg: LanguageConfig, world: int, layouts: Sequence[str]) -> None:
    """ConfigError, one line, on a shape the model or tensor parallelism at `world` cannot take."""
    _spec(cfg).validate(ModelConfig(language=cfg))
    if "tp" in layouts:
        odd = [f"{k}={v}" for k, v in _spec(cfg).tp_divisible(ModelConfig(language=cfg)).items() if v % world]
        if odd:
            raise ConfigError(f"tp={world} must divide {', '.join(odd)}; change --world or the model's size")


def num_params(cfg: LanguageConfig) -> int:
    return _spec(cfg).num_params(ModelConfig(language=cfg))


def model_bytes(cfg: LanguageConfig) -> int:
    """The full model's bytes in fp32, the loaded model's dtype."""
    return 4 * num_params(cfg)


def build_on_meta(cfg: LanguageConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return _spec(cfg).build(ModelConfig(language=cfg))


@torch.no_grad()
def write_checkpoint(cfg: LanguageConfig, folder: Path, shards: int = 4, dtype: str = "fp32") -> None:
    """The model with seeded uniform weights (norms at one), as a Hugging Face folder of about `shards`
    safetensors files of `dtype` + the index. The model is freed on return."""
    lm = build_on_meta(cfg)
    lm.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    for name, p in lm.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.uniform_(-0.02, 0.02, generator=g)
    file_bytes = model_bytes(cfg) * DTYPES[dtype].itemsize // 4
    export_language(lm, folder, DTYPES[dtype], max_shard_bytes=-(-file_bytes // shards))
    del lm
    gc.collect()


def _holds(folder: Path, cfg: LanguageConfig, dtype: str) -> bool:
    """Whether folder already holds a checkpoint of cfg's shape and dtype (to reuse --dir); refused if another."""
    if not folder.exists() or not any(folder.iterdir()):
        return False
    theirs = language_config_from_hf(folder)
    grown = [("vocab_size", cfg.vocab_size, theirs.vocab_size)] if cfg.vocab_size > theirs.vocab_size else []
    diffs = language_mismatches(cfg, theirs) + grown  # (which lets a larger vocabulary through)
    written = read_hf_config(folder).get("torch_dtype")
    if written != str(DTYPES[dtype]).removeprefix("torch."):
        diffs.append(("dtype", str(DTYPES[dtype]).removeprefix("torch."), written))
    if diffs:
        listed = ", ".join(f"{f}={ours!r} (there: {want!r})" for f, ours, want in diffs)
        raise HFCheckpointError(f"{folder} holds another model ({listed}); pass a new --dir")
    return True


@contextmanager
def checkpoint(cfg: LanguageConfig, folder: Optional[str] = None, shards: int = 4,
               dtype: str = "fp32") -> Iterator[Path]:
    """The checkpoint's folder: `folder` (written unless it already holds this one, kept) or a temporary one."""
    if folder is not None:
        if not _holds(Path(folder), cfg, dtype):
            write_checkpoint(cfg, Path(folder), shards, dtype)
        yield Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix="mmfm-hf-load-") as tmp:
        write_checkpoint(cfg, Path(tmp) / "llama", shards, dtype)
        yield Path(tmp) / "llama"


# ---------------------------------------------------------------- memory of one rank


def proc_status_kb(field: str) -> int:
    """A `field: N kB` line of /proc/self/status, in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def rss_anon() -> int:
    """Anonymous resident bytes: the process's private memory, without mapped file pages."""
    return proc_status_kb("RssAnon") * 1024


class AnonPeak:
    """The largest RssAnon seen while the block runs, sampled every SAMPLE_S by a background thread."""

    def __enter__(self) -> "AnonPeak":
        self.peak, self.samples, self._stop = rss_anon(), 1, threading.Event()
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)  # the loading thread yields the GIL often, so that the sampler runs
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        self.peak, self.samples = max(self.peak, rss_anon()), self.samples + 1

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        sys.setswitchinterval(self._switch)


def local_bytes(lm: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds (its DTensor shards; replicated ones in full)."""
    locals_ = (p.to_local() if isinstance(p, DTensor) else p for p in lm.parameters())
    return sum(t.numel() * t.element_size() for t in locals_)


def sharded_model(cfg: LanguageConfig, layout: str, world: int) -> torch.nn.Module:
    """The model on meta, split by tp or FSDP over `world` ranks, then given (untouched) CPU memory."""
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=(layout,))
    lm = build_on_meta(cfg)
    if layout == "tp":
        _spec(cfg).apply_tensor_parallel(lm, mesh)
    else:
        apply_fsdp(lm, mesh, ("layers",))
    lm.to_empty(device="cpu")
    lm.init_buffers()
    return lm


def measure_load(lm: torch.nn.Module, folder: Path) -> dict:
    gc.collect()
    baseline = rss_anon()
    with AnonPeak() as peak:
        load_language(lm, folder)
    return {"baseline": baseline, "peak": peak.peak, "samples": peak.samples, "local_bytes": local_bytes(lm),
            "vmhwm": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _worker(rank: int, world: int, port: int, out: str, cfg: dict, folder: str, layout: str) -> None:
    set_local_env(rank, world, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
    lm = sharded_model(LanguageConfig(**cfg), layout, world)
    dist.barrier()  # every rank materialized: the loads start together
    result = {"rank": rank, **measure_load(lm, Path(folder))}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # no rank tears its gloo group down while another is still in a collective
    dist.destroy_process_group()


def measure(cfg: LanguageConfig, folder: Path, layout: str, world: int) -> list[dict]:
    """One dict per rank (baseline, peak, samples, local_bytes, vmhwm), from `world` fresh processes."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, free_port(), out, vars(cfg), str(folder), layout), nprocs=world,
                           join=True, start_method="spawn")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def hf_load_bench(cfg: LanguageConfig, layouts: Sequence[str] = LAYOUTS, world: int = 4,
                  folder: Optional[str] = None, shards: int = 4, dtype: str = "fp32") -> dict[str, list[dict]]:
    """layout -> its ranks' measurements (see `measure`), the checkpoint written first (see `checkpoint`)."""
    check(cfg, world, layouts)
    with checkpoint(cfg, folder, shards, dtype) as path:
        return {layout: measure(cfg, path, layout, world) for layout in layouts}


# ---------------------------------------------------------------- the report


def _mib(n: int) -> str:
    return f"{n / MiB:,.1f}"


def _table(header: Sequence[str], rows: list[Sequence]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def describe(cfg: LanguageConfig, folder: Path, dtype: str) -> str:
    files = len(list(folder.glob("*.safetensors")))
    return (f"model: kind=llama, hidden {cfg.hidden_size}, {cfg.num_layers} layers, intermediate "
            f"{cfg.intermediate_size}, heads {cfg.num_heads}/{cfg.num_kv_heads} kv, vocab {cfg.vocab_size}, untied: "
            f"{num_params(cfg):,} parameters = {model_bytes(cfg):,} bytes ({_mib(model_bytes(cfg))} MiB) in fp32\n"
            f"checkpoint: {dtype}, {files} safetensors files + index in {folder}")


def table(results: dict[str, list[dict]], full: int) -> str:
    rows = [(f"{layout}={len(ranks)}", r["rank"], _mib(r["local_bytes"]), _mib(r["baseline"]),
             _mib(r["peak"] - r["baseline"]), f"{(r['peak'] - r['baseline']) / full:.3f}", _mib(r["vmhwm"]))
            for layout, ranks in results.items() for r in ranks]
    return _table(["layout", "rank", "shard MiB", "anon before MiB", "peak anon increase MiB", "/ full model",
                   "VmHWM MiB (+file pages)"], rows)


def verdict(results: dict[str, list[dict]], full: int) -> str:
    worst = {layout: max(r["peak"] - r["baseline"] for r in ranks) for layout, ranks in results.items()}
    top = max(worst.values())
    each = ", ".join(f"{layout} {_mib(v)} MiB" for layout, v in worst.items())
    held = "no rank held the full model" if top < full else "a rank may have held the full model"
    return (f"verdict: largest peak anonymous increase during the load per rank: {each} = at most {top / full:.2f} "
            f"of the full model ({_mib(full)} MiB): {held}")


NOTE = ("peak anon increase: the largest RssAnon (private memory) during load_language minus RssAnon before it: "
        "the rank's shard, untouched until the load, plus whatever the load allocates. VmHWM is the whole process's "
        "high-water mark, with every mapped file page: torch's libraries and the safetensors pages the rank read "
        "through mmap, page cache shared by all ranks, not memory a rank holds.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    p.add_argument("--layers", type=int, default=24, help="decoder layers (default 24)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (default 32000)")
    p.add_argument("--intermediate", type=int, default=0, help="SwiGLU width (default: 11/4 of --hidden)")
    p.add_argument("--heads", type=int, default=16, help="attention heads (default 16)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default 4)")
    p.add_argument("--world", type=int, default=4, help="ranks of each layout (default 4)")
    p.add_argument("--layout", choices=["tp", "fsdp", "both"], default="both",
                   help="layouts to measure (default both)")
    p.add_argument("--shards", type=int, default=4, help="safetensors files to write, about (default 4)")
    p.add_argument("--checkpoint-dtype", choices=sorted(DTYPES), default="fp32",
                   help="dtype of the written checkpoint; the model is fp32 (bf16: each slice is converted, a "
                        "private copy) (default fp32)")
    p.add_argument("--dir", help="write the checkpoint here and keep it (reused when it holds the same shape and "
                                 "dtype; default: a temporary folder)")


def run(args: argparse.Namespace) -> int:
    cfg = language_config(args.hidden, args.layers, args.vocab, args.intermediate, args.heads, args.kv_heads)
    layouts = LAYOUTS if args.layout == "both" else (args.layout,)
    check(cfg, args.world, layouts)
    with checkpoint(cfg, args.dir, args.shards, args.checkpoint_dtype) as folder:
        print(describe(cfg, folder, args.checkpoint_dtype), flush=True)
        results = {layout: measure(cfg, folder, layout, args.world) for layout in layouts}
    print(f"{args.world} gloo ranks per layout, 1 thread each; RssAnon sampled every {SAMPLE_S * 1000:g} ms")
    print(table(results, model_bytes(cfg)))
    print(NOTE)
    print(verdict(results, model_bytes(cfg)))
    return 0
