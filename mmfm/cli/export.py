"""`mmfm export`: a training run's checkpoint as a Hugging Face folder (LLaVA, or the language model alone), or a LoRA
run's adapters as a PEFT adapter folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmfm.cli.errors import one_line_errors


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmfm export", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("checkpoint", help="a run directory (its latest checkpoint) or one of its checkpoints/step_* folders")
    p.add_argument("--format", choices=["hf", "peft"], required=True, help="hf: config.json + safetensors, the "
                   "tokenizer with its chat template and (VLM) preprocessor_config.json, as save_pretrained writes; "
                   "peft: a LoRA run's language-model adapters as PEFT's adapter folder (adapter_config.json + "
                   "adapter_model.safetensors) for the transformers base model")
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--language-only", action="store_true",
                   help="write the language model alone, as its *ForCausalLM (any vision tower)")
    p.add_argument("--merge-lora", action="store_true",
                   help="a LoRA run (--format hf): fold the adapters into the base weights, W + scale * B A")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    from mmfm.checkpoint import find_checkpoint
    from mmfm.checkpoint.hf import HFCheckpointError, export_language
    from mmfm.checkpoint.hf_vlm import export_vlm
    from mmfm.checkpoint.run_model import load_run_model
    from mmfm.config.load import load_run_config
    from mmfm.data.tokenizer import TOKENIZER_FILE, TextTokenizer, export_tokenizer
    from mmfm.models.clip.state_dict_adapter import ADAPTERS
    from mmfm.models.lora import merge_lora

    run_dir, ckpt = find_checkpoint(Path(args.checkpoint))
    cfg = load_run_config(run_dir / "config.yaml")
    check_lora_flags(args, cfg.model.lora.enabled, run_dir)
    if args.format == "peft":
        return export_run_adapters(cfg, ckpt, args.out)
    if not args.language_only and cfg.model.action_head.kind != "none":
        raise HFCheckpointError(f"{run_dir} has a {cfg.model.action_head.kind} action head (stage.vla.action=flow), "
                                "which no Hugging Face LLaVA class holds: add --language-only to export the language "
                                "model alone, or keep the run directory for Policy.from_checkpoint")
    if not args.language_only and cfg.model.vision.kind not in ADAPTERS:  # before loading anything
        raise HFCheckpointError(f"model.vision.kind={cfg.model.vision.kind} has no Hugging Face form (LLaVA's tower "
                                "is CLIP or SigLIP; tiny_vlm's vit has no transformers class): add --language-only "
                                "to export the language model alone, or train with model=tiny_llava (a SigLIP tower)")
    image_id = TextTokenizer.load(run_dir / TOKENIZER_FILE).image_id
    if not args.language_only and image_id != cfg.model.image_token_id:
        raise HFCheckpointError(f"{run_dir / TOKENIZER_FILE}: <image> is id {image_id} but the model's "
                                f"image_token_id is {cfg.model.image_token_id}; export the run with its own tokenizer")
    if not cfg.model.lora.enabled:  # the checkpoint holds every weight (a LoRA run's base comes from these)
        cfg.model.pretrained.vlm = cfg.model.pretrained.vision = cfg.model.pretrained.language = ""
    model = load_run_model(cfg, ckpt)
    if args.merge_lora:
        merge_lora(model)
    if args.language_only:
        return export_language(model.language, args.out,
                               extras=lambda folder: export_tokenizer(run_dir, folder, cfg.data.chat))
    return export_vlm(model, args.out, extras=lambda folder: processor_files(cfg, run_dir, folder))


def check_lora_flags(args: argparse.Namespace, lora: bool, run_dir: Path) -> None:
    from mmfm.checkpoint.hf import HFCheckpointError

    if lora and args.format == "hf" and not args.merge_lora:
        raise HFCheckpointError(f"{run_dir} trained LoRA adapters (model.lora.enabled=true): add --merge-lora to fold "
                                "them into the base weights, or use --format peft to write the adapters alone")
    if not lora and (args.merge_lora or args.format == "peft"):
        flag = "--merge-lora" if args.merge_lora else "--format peft"
        raise HFCheckpointError(f"{run_dir} has no LoRA adapters (model.lora.enabled=false): drop {flag} and export "
                                "with --format hf")


def export_run_adapters(cfg, ckpt: Path, out: str) -> Path:
    """--format peft: the run's language-model adapters for PEFT (adapters elsewhere are refused)."""
    from mmfm.checkpoint.hf import HFCheckpointError
    from mmfm.checkpoint.peft import export_peft
    from mmfm.checkpoint.run_model import load_run_model
    from mmfm.models.lora import lora_modules

    model = load_run_model(cfg, ckpt)
    elsewhere = [n for n, _ in lora_modules(model) if not n.startswith("language.")]
    if elsewhere:
        raise HFCheckpointError(f"--format peft writes the language model's adapters, but the run also adapted "
                                f"{elsewhere[0]} ({len(elsewhere)} outside the language model); export with "
                                "--format hf --merge-lora instead")
    return export_peft(model.language, cfg.model.lora, out, cfg.model.pretrained.language or None)


def processor_files(cfg, run_dir: Path, folder: Path) -> None:
    """The tokenizer (with its chat template) and preprocessor_config.json of data.image."""
    import json

    from mmfm.data.processor import processor_config_to_hf
    from mmfm.data.tokenizer import export_tokenizer

    export_tokenizer(run_dir, folder, cfg.data.chat)
    processor = processor_config_to_hf(cfg.data.image, cfg.model.vision.image_size)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with one_line_errors("mmfm export"):
        print(run(args))
    return 0
