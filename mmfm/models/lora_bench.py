"""Memory of LoRA against full fine-tuning: `mmfm bench lora` (or `python benchmarks/lora_memory.py`).

One model, one data set, six runs, each in a fresh process (so that memory one run freed cannot hide in the
next one's baseline): SFT and DPO, each with every weight trained (full), with adapters on an fp32 base (lora) and
with adapters on a bf16 base (lorabf16: model.lora.base_dtype=bf16, the adapted linears' weights in bf16).

1. Synthetic scenes are written to a temporary folder (captions, conversations and preference pairs with one
   tokenizer, as docs/alignment.md builds them), and a base model is trained for one step and saved: the
   `stage.init_from` of every run (DPO's reference is that checkpoint).
2. Each run builds its Trainer and trains --steps steps. Measured: RssAnon (/proc/self/status, the process's
   private memory, without mapped file pages) before the Trainer is built, and the largest RssAnon while it is
   built and trains (sampled every 2 ms, as `mmfm bench hf-load` does). Counted exactly: the weights' bytes, the
   trainable parameters, the optimizer state's bytes, the gradients' bytes (one fp32 value per trainable parameter) and
   the frozen reference model's bytes (full DPO builds a copy; LoRA's reference is the policy with its adapters
   disabled, no copy).

The peak includes the activations of one micro-batch and allocator slack, which do not shrink with LoRA; the
larger the model against the batch, the closer the ratio gets to the model-state ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from mmfm.checkpoint.hf_bench import AnonPeak, MiB, _table, rss_anon

RUNS = ("full-sft", "lora-sft", "lorabf16-sft", "full-dpo", "lora-dpo", "lorabf16-dpo")
# A run's kind -> (its label in the ratios, model.lora.base_dtype); "full" trains every weight, no adapters.
LORA_KINDS = {"lora": ("LoRA", "fp32"), "lorabf16": ("LoRA on a bf16 base", "bf16")}
QUIET = ["logger.wandb.enabled=false", "logger.progress_bar=false", "train.val_every=0", "eval.num_samples=0"]


def model_overrides(hidden: int, layers: int) -> list[str]:
    """The tiny VLM with a wider, deeper language model: the language model is what LoRA shrinks."""
    return [f"model.language.hidden_size={hidden}", f"model.language.num_layers={layers}",
            f"model.language.intermediate_size={hidden * 11 // 4}", "model.language.num_heads=8",
            "model.language.num_kv_heads=4", "model.language.max_seq_len=96", "data.seq_len=80",
            "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.hidden_size=64",
            "model.vision.num_layers=1"]


def build_data(root: Path, samples: int) -> dict[str, Path]:
    from mmfm.data.synth import build_synth_dataset
    from mmfm.data.synth_instruct import build_instruct_dataset

    build_synth_dataset(root / "synth", train_size=samples, val_size=16, shard_size=samples, image_size=32,
                        instruct_text=True, pair_captions="shuffled", progress=False)
    tokenizer = root / "synth" / "tokenizer.json"
    for kind, name in (("sft", "sft"), ("preference", "preference")):
        build_instruct_dataset(root / name, kind, tokenizer, train_size=samples, val_size=16, image_size=32,
                               shard_size=samples, max_turns=2, progress=False)
    return {"synth": root / "synth", "sft": root / "sft", "preference": root / "preference"}


def run_overrides(run: str, data: dict[str, Path], base: Path, model: list[str], batch: int, steps: int,
                  rank: int) -> list[str]:
    kind, stage = run.split("-")
    path = data["sft" if stage == "sft" else "preference"]
    lora = [] if kind == "full" else ["model.lora.enabled=true", f"model.lora.rank={rank}",
                                      f"model.lora.alpha={2 * rank}", f"model.lora.base_dtype={LORA_KINDS[kind][1]}"]
    return [f"data.path={path}", *model, *QUIET, f"stage={stage}", f"stage.init_from={base}",
            f"data.batch_size={batch}", f"train.max_steps={steps}", "train.schedule.warmup_steps=1",
            "checkpoint.every=0", *lora]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_run(overrides: list[str], run_dir: Path) -> dict:
    """Build and train one Trainer; its peak private memory and its model state's bytes."""
    from mmfm.config import load_config
    from mmfm.train.trainer import Trainer

    cfg = load_config(overrides)
    baseline = rss_anon()
    with AnonPeak() as peak:
        trainer = Trainer(cfg, run_dir)
        trainer.fit()
    params = list(trainer.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    state = [t for opt in trainer.optimizers for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    reference = list(trainer.reference.parameters()) if trainer.reference is not None else []
    return {"params": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in trainable),
            "bf16_params": sum(p.numel() for p in params if p.dtype == torch.bfloat16),
            "param_bytes": _bytes(params), "grad_bytes": 4 * sum(p.numel() for p in trainable),
            "optimizer_bytes": _bytes(state), "reference_bytes": _bytes(reference),
            "baseline": baseline, "peak": peak.peak}


def _worker(_index: int, overrides: list[str], run_dir: str, out: str) -> None:
    Path(out).write_text(json.dumps(measure_run(overrides, Path(run_dir))))


def in_fresh_process(overrides: list[str], run_dir: Path) -> dict:
    out = run_dir.with_suffix(".json")
    mp.start_processes(_worker, args=(overrides, str(run_dir), str(out)), nprocs=1, join=True, start_method="spawn")
    return json.loads(out.read_text())


def lora_bench(hidden: int = 512, layers: int = 8, rank: int = 8, batch: int = 4, steps: int = 3,
               samples: int = 64, runs=RUNS, measure=in_fresh_process) -> dict[str, dict]:
    """run -> its figures (see measure_run), each run in a fresh process (measure=measure_run: in this one)."""
    from mmfm.config import load_config
    from mmfm.train.trainer import Trainer

    model = model_overrides(hidden, layers)
    with tempfile.TemporaryDirectory(prefix="mmfm-lora-bench-") as tmp:
        root = Path(tmp)
        data = build_data(root, samples)
        base = root / "base"
        Trainer(load_config([f"data.path={data['synth']}", *model, *QUIET, f"data.batch_size={batch}",
                             "train.max_steps=1", "train.schedule.warmup_steps=0", "checkpoint.every=1"]), base).fit()
        return {run: measure(run_overrides(run, data, base, model, batch, steps, rank), root / run)
                for run in runs}


def table(results: dict[str, dict]) -> str:
    rows = [(run, f"{r['param_bytes'] / MiB:,.1f}", f"{r['trainable']:,}", f"{r['trainable'] / r['params']:.2%}",
             f"{r['grad_bytes'] / MiB:,.1f}",
             f"{r['optimizer_bytes'] / MiB:,.1f}", f"{r['reference_bytes'] / MiB:,.1f}",
             f"{(r['peak'] - r['baseline']) / MiB:,.1f}") for run, r in results.items()]
    return _table(["run", "weights MiB", "trainable params", "of all", "grads MiB", "optimizer MiB", "reference copy MiB",
                   "peak private increase MiB"], rows)


def ratios(results: dict[str, dict]) -> str:
    lines = []
    for stage in ("sft", "dpo"):
        full = results.get(f"full-{stage}")
        for kind, (label, _) in LORA_KINDS.items():
            lora = results.get(f"{kind}-{stage}")
            if full and lora:
                ratio = (lora["peak"] - lora["baseline"]) / (full["peak"] - full["baseline"])
                lines.append(f"{stage}: {label}'s peak private increase is {ratio:.2f} of full fine-tuning's")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=512, help="language model width (default 512)")
    p.add_argument("--layers", type=int, default=8, help="language model layers (default 8)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8; alpha = 2 x rank)")
    p.add_argument("--batch-size", type=int, default=4, help="samples (DPO: pairs) per step (default 4)")
    p.add_argument("--steps", type=int, default=3, help="training steps per run (default 3)")


def run(args: argparse.Namespace) -> int:
    results = lora_bench(args.hidden, args.layers, args.rank, args.batch_size, args.steps)
    first = next(iter(results.values()))
    print(f"language model {args.hidden} wide, {args.layers} layers: {first['params']:,} parameters "
          f"({first['param_bytes'] / MiB:,.1f} MiB fp32); LoRA rank {args.rank} on attention q/k/v/o and the "
          f"SwiGLU projections; {args.batch_size} per step, {args.steps} steps, one process per run")
    print(table(results))
    print(ratios(results))
    return 0
