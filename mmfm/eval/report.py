"""`mmfm eval`'s model loading, result files and curves: eval/<step>/results.json (every task's scores, item and
missing-image counts), results.md (the same as a table), predictions/<task>.jsonl (each item's answer), and for
--all-checkpoints eval/curves.png and eval/curves.md (each metric against the step)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from mmfm.errors import MmfmError
from mmfm.eval.synth_suite import DEFAULT_TASKS
from mmfm.eval.runner import ModelAnswerer, TaskResult, constant_baseline, run_task, run_tasks
from mmfm.eval.tasks import load_items, resolve_task

log = logging.getLogger(__name__)


def model_source(path: Path) -> tuple[Path, Optional[Path]]:
    """(folder, checkpoint) of what `mmfm eval` is given: a Hugging Face LLaVA folder (checkpoint None), or a run
    directory / step_* folder (its run directory and checkpoint)."""
    from mmfm.checkpoint import find_checkpoint
    from mmfm.checkpoint.hf_vlm import is_hf_folder

    if is_hf_folder(path):
        return path, None
    return find_checkpoint(path)


def load_answerer(path: Path, checkpoint: Optional[Path], batch_size: int, device: str) -> ModelAnswerer:
    """The model of a run's checkpoint (checkpoint set) or of a Hugging Face folder, ready to answer."""
    from mmfm.cli.generate import from_hf_folder, from_run
    from mmfm.train.trainer import pick_device

    device = pick_device(device)
    if checkpoint is None:
        model, tokenizer, encoder = from_hf_folder(path, None, device)
    else:
        check_tokenizer(path, checkpoint)
        model, tokenizer, encoder = from_run(checkpoint, None, device)
    check_vocab(model, tokenizer, checkpoint or path)
    return ModelAnswerer(model.eval(), tokenizer, encoder, device, batch_size, progress=True)


def load_sharded_answerer(run_dir: Path, checkpoint: Path, layout: list[str], batch_size: int) -> ModelAnswerer:
    """The checkpoint's model built at the run's config with the `parallel.*` overrides in `layout`, on this
    process's share of the launcher's ranks (torchrun): each rank loads only its shards (torch.distributed
    checkpoint reshards any saved layout), and nothing is gathered whole on one rank."""
    from mmfm.checkpoint.manager import CheckpointManager
    from mmfm.config import preflight
    from mmfm.config.load import load_run_config
    from mmfm.data.build import sample_encoder
    from mmfm.data.manifest import TOKENIZER
    from mmfm.data.tokenizer import TextTokenizer
    from mmfm.parallel.distributed import init_distributed
    from mmfm.parallel.parallelize import parallelize

    check_tokenizer(run_dir, checkpoint)
    checked = preflight(load_run_config(run_dir / "config.yaml", [*layout, "eval.tasks=[]"]))
    cfg, dims = checked.cfg, checked.dims
    if dims.pp > 1 or dims.cp > 1 or cfg.model.lora.enabled:
        raise MmfmError("sharded `mmfm eval` runs data- and tensor-parallel layouts of full (not LoRA) runs; "
                        f"parallel.pp={dims.pp}, parallel.cp={dims.cp}, model.lora.enabled={cfg.model.lora.enabled}: "
                        "evaluate in one process instead")
    _, world = init_distributed(checked.device, cfg.faults.collective_timeout_s)
    mesh = dims.build_mesh(checked.device.type) if world > 1 else None
    parts = parallelize(cfg, dims, checked.device, mesh, kernels=checked.kernels)
    CheckpointManager.load(checkpoint, parts.parts)
    tokenizer = TextTokenizer.load(run_dir / TOKENIZER)
    check_vocab(parts.parts[0], tokenizer, checkpoint)
    return ModelAnswerer(parts.parts[0].eval(), tokenizer, sample_encoder(cfg, tokenizer), checked.device, batch_size,
                         stop_early=world == 1, progress=is_main(), multiple=dims.tp)


def is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def check_tokenizer(run_dir: Path, checkpoint: Path) -> None:
    """Refuse a checkpoint whose recorded tokenizer is not the run directory's tokenizer.json."""
    from mmfm.checkpoint.manager import read_trainer_state
    from mmfm.data.manifest import TOKENIZER, sha256_file

    recorded = (read_trainer_state(checkpoint).get("record") or {}).get("tokenizer_sha256")
    held = run_dir / TOKENIZER
    if recorded and held.is_file() and sha256_file(held) != recorded:
        raise MmfmError(f"checkpoint {checkpoint} was trained with another tokenizer than {held}; evaluate it from "
                        "the run directory it was trained in")


def check_vocab(model, tokenizer, where: Path) -> None:
    size = model.cfg.language.vocab_size
    if tokenizer.vocab_size > size:
        raise MmfmError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                        f"{size}: they come from different models; evaluate with the model's own tokenizer")


def evaluate_checkpoint(path: Path, checkpoint: Optional[Path], names: Optional[list[str]], args, out: Path,
                        layout: Optional[list[str]] = None) -> dict:
    """Score one checkpoint on the named tasks (None: the synthetic suite's defaults for the model) and with
    args.baseline the constant baseline; write out/ (rank 0 of a sharded evaluation: `layout` overrides)."""
    tasks = [load_items(resolve_task(n), args.limit) for n in names or []]  # bad tasks fail before the model loads
    answerer = (load_sharded_answerer(path, checkpoint, layout, args.batch_size) if layout
                else load_answerer(path, checkpoint, args.batch_size, args.device))
    if names is None:
        chat = hasattr(answerer.encoder, "question")
        tasks = [load_items(resolve_task(n), args.limit) for n in DEFAULT_TASKS["chat" if chat else "pretrain"]]
    results: dict[str, dict] = {}
    for task_items, result in zip(tasks, run_tasks(answerer, tasks)):
        results[result.name] = result.summary()
        if args.baseline:
            baseline = run_task(constant_baseline(task_items, answerer.model.cfg.language.vocab_size,
                                                  answerer.tokenizer), task_items)
            results[result.name]["baseline"] = baseline.scores
        if is_main():
            write_predictions(out, result)
        if result.missing_images and is_main():
            log.warning("task %s: %d item(s) without their image file, left out: %s", result.name,
                        len(result.missing_images), ", ".join(result.missing_images[:5]))
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(markdown_table(results))
    return results


def write_predictions(out: Path, result: TaskResult) -> None:
    folder = out / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{result.name.replace('/', '_')}.jsonl").open("w") as f:
        for row in result.predictions:
            f.write(json.dumps(row) + "\n")


def metric_rows(results: dict) -> list[tuple[str, str, float, Optional[float], int, int]]:
    """(task, metric, value, baseline value or None, items, missing images) for every metric of every task."""
    rows = []
    for task, r in results.items():
        for metric, value in r.items():
            if metric in ("type", "items", "missing_images", "baseline", "unparsed"):
                continue
            rows.append((task, metric, value, (r.get("baseline") or {}).get(metric), r["items"], r["missing_images"]))
    return rows


def markdown_table(results: dict) -> str:
    lines = ["| task | metric | value | constant baseline | items | missing images |", "|---|---|---|---|---|---|"]
    for task, metric, value, baseline, items, missing in metric_rows(results):
        base = "-" if baseline is None else f"{baseline:.4f}"
        lines.append(f"| {task} | {metric} | {value:.4f} | {base} | {items} | {missing} |")
    return "\n".join(lines) + "\n"


def print_table(step: str, results: dict) -> None:
    print(f"step {step}")
    for task, metric, value, baseline, items, missing in metric_rows(results):
        base = "" if baseline is None else f"  (constant baseline {baseline:.4f})"
        lost = f", {missing} missing image(s)" if missing else ""
        print(f"  {task:<22} {metric:<13} {value:9.4f}{base}  [{items} items{lost}]")


def plot_curves(results: dict[str, dict], out: Path) -> Path:
    """eval/curves.png (one panel per task and metric, value against step) and eval/curves.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(results, key=lambda s: int(s) if s.isdigit() else -1)
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for step in steps:
        for task, metric, value, *_ in metric_rows(results[step]):
            series.setdefault((task, metric), []).append((int(step), value))
    fig, axes = plt.subplots(1, max(len(series), 1), figsize=(4 * max(len(series), 1), 3.2), squeeze=False)
    for ax, ((task, metric), points) in zip(axes[0], series.items()):
        ax.plot(*zip(*points), marker="o")
        ax.set_title(f"{task}\n{metric}", fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    header = "| step | " + " | ".join(f"{t} {m}" for t, m in series) + " |"
    lines = [header, "|---" * (len(series) + 1) + "|"]
    for step in steps:
        values = {(t, m): v for t, m, v, *_ in metric_rows(results[step])}
        lines.append(f"| {step} | " + " | ".join(f"{values.get(k, float('nan')):.4f}" for k in series) + " |")
    (out / "curves.md").write_text("\n".join(lines) + "\n")
    return out / "curves.png"
