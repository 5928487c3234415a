"""`mmfm generate`: captions (or answers to a prompt) for image files, from a training checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmfm.cli.errors import one_line_errors
from mmfm.errors import MmfmError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmfm generate", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--checkpoint", required=True,
                   help="a run directory (uses its latest checkpoint) or one of its checkpoints/step_* folders")
    p.add_argument("--images", nargs="+", required=True, help="image files (png, jpg, webp)")
    p.add_argument("--prompt", default=None, help="text after the image; default: the prompt the model trained with")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampled decoding")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    return p.parse_args(argv)


def load_images(paths: list[str], processor):
    """The images' pixels [N, C, H, W], made by `processor` (mmfm.data.processor.ImageProcessor)."""
    import torch

    from mmfm.data.loader import load_image

    tensors = []
    for p in paths:
        try:
            tensors.append(load_image(Path(p).read_bytes(), processor))
        except Exception as exc:
            raise MmfmError(f"cannot read image {p} ({type(exc).__name__}: {exc})") from None
    return torch.stack(tensors)


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from mmfm.checkpoint import CheckpointManager, find_checkpoint
    from mmfm.config.load import load_run_config
    from mmfm.data.build import sample_encoder
    from mmfm.data.tokenizer import TextTokenizer
    from mmfm.models import build_model
    from mmfm.models.generate import generate
    from mmfm.train.trainer import pick_device

    run_dir, ckpt = find_checkpoint(Path(args.checkpoint))
    cfg = load_run_config(run_dir / "config.yaml")
    if args.prompt is not None:
        cfg.data.prompt = args.prompt
    device = pick_device(args.device)
    tokenizer = TextTokenizer.load(run_dir / "tokenizer.json")
    encoder = sample_encoder(cfg, tokenizer)
    model = build_model(cfg.model, device)
    CheckpointManager.load(ckpt, model)
    model.eval()
    pixels = load_images(args.images, encoder.processor).to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    results = []
    for start in range(0, len(args.images), args.batch_size):
        names = args.images[start: start + args.batch_size]
        outs = generate(model, [encoder.prefix(1)] * len(names), pixels[start: start + len(names)],
                        args.max_new_tokens, tokenizer.eos_id, tokenizer.pad_id, args.temperature, args.top_k,
                        generator)
        results += [{"image": n, "text": tokenizer.decode(o).strip()} for n, o in zip(names, outs)]
    return results


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with one_line_errors("mmfm generate"):
        for r in run(args):
            print(json.dumps(r) if args.json else f"{r['image']}\t{r['text']}")
    return 0
