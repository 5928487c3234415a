"""The `mmfm` command tree in one place: the dispatch of `mmfm <command>` (mmfm.cli.main), the `mmfm --help` text
and the one-line help of the tools of `mmfm data` and `mmfm bench` all read these tables, so none can miss one."""

from __future__ import annotations

import argparse
import textwrap

# command -> (module whose main(argv) runs it, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mmfm.cli.train", "train a model: `mmfm train [hydra overrides]` (e.g. experiment=demo); --cfg job "
                                "prints the resolved config, --help lists config groups, --multirun sweeps"),
    "launch": ("mmfm.cli.launch", "run a training job with torchrun here or through Slurm: `mmfm launch [--dry-run] "
                                  "[-m] [overrides]` (e.g. cluster=slurm cluster.nodes=16)"),
    "plan": ("mmfm.cli.plan", "rank every parallel layout of a job by predicted step time, with memory per rank and "
                              "MFU: `mmfm plan model=vlm_7b hardware=h100 devices=64 global_batch=512 seq_len=4096`"),
    "generate": ("mmfm.cli.generate", "caption or answer for image files from a checkpoint (greedy or sampled, "
                                      "KV-cached)"),
    "eval": ("mmfm.cli.eval", "score a checkpoint on evaluation tasks (captioning CIDEr/BLEU, VQA accuracy, multiple "
                              "choice, perplexity): `mmfm eval RUN tasks=[synth/caption,...] [--all-checkpoints]`"),
    "export": ("mmfm.cli.export", "a checkpoint as a Hugging Face folder: `mmfm export RUN --format hf --out DIR "
                                  "[--language-only]` (LLaVA, or the language model's *ForCausalLM)"),
    "convert": ("mmfm.cli.convert", "a checkpoint between mmfm's format and DeepSpeed's ZeRO format, both ways: "
                                    "`mmfm convert RUN --to deepspeed --out DIR`, `mmfm convert DIR --to dcp --out RUN`"),
    "rollout": ("mmfm.cli.rollout", "a vision-language-action policy (stage=vla) in closed loop on the simulated "
                                    "pick-up task: success rate over seeded episodes, GIFs: `mmfm rollout RUN`"),
    "data": ("mmfm.cli.data", "data set tools: synthetic, instruction and preference data, recipe builds"),
    "bench": ("mmfm.cli.bench", "benchmarks: parallelism (CPU processes, gloo), kernels (GPU timing, CPU memory), "
                                "data loading, Hugging Face import memory"),
}

# command -> {tool: one-line description} for the commands made of argparse subcommands
TOOLS: dict[str, dict[str, str]] = {
    "data": {
        "synth": "make the synthetic image-caption data set (no download)",
        "instruct": "make instruction (sft) or preference data from the synthetic scenes",
        "reference-logps": "store a reference model's log-probs with preference pairs",
        "robot-demos": "record the simulated pick-up task's scripted expert as a LeRobot data set",
        "build": "build a data set from a recipe YAML (examples: data_pipeline/ in the repository)",
    },
    "bench": {
        "parallel": "collective bytes per layout vs analytic; pipeline idle fraction per schedule",
        "kernels": "each kernel vs eager / torch.compile / Liger: time and peak memory (GPU); fused linear "
                   "cross-entropy memory (CPU)",
        "data": "loader samples/s (in-process, 1 and 2 workers) vs raw tar read and vs what training consumes",
        "data-scale": "bytes and shards each of W data-parallel ranks reads per epoch (W up to 1024), and the time to "
                      "the first sample after a resume",
        "hf-load": "each rank's peak private memory while importing a Hugging Face checkpoint at tp=N and fsdp=N, "
                   "vs the full model's size",
        "lora": "peak private memory, trainable parameters, optimizer and reference bytes: full fine-tuning vs "
                "LoRA, for SFT and DPO",
    },
}


def add_tool(sub, command: str, tool: str, **kwargs) -> argparse.ArgumentParser:
    """The argparse subcommand `mmfm <command> <tool>`, its help from TOOLS (a KeyError: add it there)."""
    return sub.add_parser(tool, help=TOOLS[command][tool], **kwargs)


def usage() -> str:
    """The `mmfm --help` text: every command and tool of the tables above."""
    rows = []  # (indent + name, description)
    for command, (_, description) in COMMANDS.items():
        rows.append((f"  {command}", description))
        rows += [(f"    {command} {tool}", text) for tool, text in TOOLS.get(command, {}).items()]
    column = max(len(name) for name, _ in rows) + 2
    lines = ["usage: mmfm <command> [args]", "", "commands:"]
    for name, text in rows:
        lines += textwrap.wrap(text, width=116, initial_indent=name.ljust(column), subsequent_indent=" " * column)
    lines += ["", "`mmfm <command> --help` (or `mmfm <command> <tool> --help`) describes each one."]
    return "\n".join(lines) + "\n"
