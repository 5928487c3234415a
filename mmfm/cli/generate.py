"""`mmfm generate`: captions (or answers to a prompt) for image files, from a training checkpoint or a Hugging Face
LLaVA folder.

From a folder (config.json of LlavaForConditionalGeneration, safetensors, the tokenizer with its chat template and
preprocessor_config.json) the prompt is the chat template's user turn "<image>\n{prompt}" with the generation
prompt, as transformers' LlavaProcessor builds it; without a chat template, the caption prompt."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmfm.cli.errors import one_line_errors
from mmfm.errors import MmfmError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmfm generate", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--checkpoint", required=True,
                   help="a run directory (uses its latest checkpoint), one of its checkpoints/step_* folders, or a "
                        "Hugging Face LLaVA folder (as `mmfm export` or save_pretrained writes)")
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


def from_run(path: Path, prompt, device):
    """(model, tokenizer, encoder) of a run directory or checkpoint folder."""
    from mmfm.checkpoint import find_checkpoint
    from mmfm.checkpoint.run_model import load_run_model
    from mmfm.config.load import load_run_config
    from mmfm.data.build import sample_encoder
    from mmfm.data.tokenizer import TextTokenizer

    run_dir, ckpt = find_checkpoint(path)
    cfg = load_run_config(run_dir / "config.yaml")
    if prompt is not None:
        cfg.data.prompt = prompt
    tokenizer = TextTokenizer.load(run_dir / "tokenizer.json")
    model = load_run_model(cfg, ckpt, device)
    return model, tokenizer, sample_encoder(cfg, tokenizer)


def from_hf_folder(folder: Path, prompt, device):
    """(model, tokenizer, encoder) of a Hugging Face LLaVA folder: its weights, tokenizer and processor."""
    from mmfm.checkpoint.hf_vlm import load_vlm, model_config_from_hf
    from mmfm.config import load_config
    from mmfm.data.build import sample_encoder
    from mmfm.data.tokenizer import TextTokenizer
    from mmfm.models import build_model

    cfg = load_config([])
    cfg.model = model_config_from_hf(folder)
    tokenizer = TextTokenizer.load(folder / "tokenizer.json")
    if tokenizer.image_id != cfg.model.image_token_id:
        raise MmfmError(f"{folder}: the tokenizer's <image> is id {tokenizer.image_id} but config.json's "
                        f"image_token_index is {cfg.model.image_token_id}; they must be the same token")
    if (folder / "preprocessor_config.json").is_file():
        cfg.data.image.processor = str(folder)
    cfg.data.seq_len = cfg.model.language.max_seq_len
    cfg.stage.objective = "sft" if tokenizer.chat_template else "pretrain"
    if prompt is not None:
        cfg.data.prompt = prompt
    model = build_model(cfg.model, device)
    load_vlm(model, folder)
    return model, tokenizer, sample_encoder(cfg, tokenizer)


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from mmfm.checkpoint.hf_vlm import is_hf_folder
    from mmfm.models.generate import generate
    from mmfm.train.trainer import pick_device

    path, device = Path(args.checkpoint), pick_device(args.device)
    model, tokenizer, encoder = (from_hf_folder if is_hf_folder(path) else from_run)(path, args.prompt, device)
    model.eval()
    pixels = load_images(args.images, encoder.processor).to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    results = []
    for start in range(0, len(args.images), args.batch_size):
        names = args.images[start: start + args.batch_size]
        outs = generate(model, [encoder.prefix(1)] * len(names), pixels[start: start + len(names)],
                        args.max_new_tokens, tokenizer.eos_id, tokenizer.pad_id, args.temperature, args.top_k,
                        generator)
        results += [{"image": n, "text": tokenizer.decode(o).strip(), "token_ids": list(o)} for n, o in zip(names, outs)]
    return results


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with one_line_errors("mmfm generate"):
        for r in run(args):
            print(json.dumps({"image": r["image"], "text": r["text"]}) if args.json else f"{r['image']}\t{r['text']}")
    return 0
