"""`mmfm export`: a training run's checkpoint as a Hugging Face folder (LLaVA, or the language model alone)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmfm.cli.errors import one_line_errors


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmfm export", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("checkpoint", help="a run directory (its latest checkpoint) or one of its checkpoints/step_* folders")
    p.add_argument("--format", choices=["hf"], required=True, help="hf: config.json + safetensors, the tokenizer "
                   "with its chat template and (VLM) preprocessor_config.json, as save_pretrained writes")
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--language-only", action="store_true",
                   help="write the language model alone, as its *ForCausalLM (any vision tower)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    from mmfm.checkpoint import CheckpointManager, find_checkpoint
    from mmfm.checkpoint.hf import HFCheckpointError, export_language
    from mmfm.checkpoint.hf_vlm import export_vlm
    from mmfm.config.load import load_run_config
    from mmfm.data.tokenizer import TOKENIZER_FILE, TextTokenizer, export_tokenizer
    from mmfm.models import build_model
    from mmfm.models.clip.state_dict_adapter import ADAPTERS

    run_dir, ckpt = find_checkpoint(Path(args.checkpoint))
    cfg = load_run_config(run_dir / "config.yaml")
    if not args.language_only and cfg.model.vision.kind not in ADAPTERS:  # before loading anything
        raise HFCheckpointError(f"model.vision.kind={cfg.model.vision.kind} has no Hugging Face form (LLaVA's tower "
                                "is CLIP or SigLIP; the demo's vit has no transformers class): add --language-only "
                                "to export the language model alone")
    image_id = TextTokenizer.load(run_dir / TOKENIZER_FILE).image_id
    if not args.language_only and image_id != cfg.model.image_token_id:
        raise HFCheckpointError(f"{run_dir / TOKENIZER_FILE}: <image> is id {image_id} but the model's "
                                f"image_token_id is {cfg.model.image_token_id}; export the run with its own tokenizer")
    cfg.model.pretrained.vlm = cfg.model.pretrained.vision = cfg.model.pretrained.language = ""
    model = build_model(cfg.model, "cpu")
    CheckpointManager.load(ckpt, model)
    if args.language_only:
        return export_language(model.language, args.out,
                               extras=lambda folder: export_tokenizer(run_dir, folder, cfg.data.chat))
    return export_vlm(model, args.out, extras=lambda folder: processor_files(cfg, run_dir, folder))


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
