"""docs/newcomer.md as a test, on tiny random models: from a pretrained language model (Qwen2, with its ChatML
tokenizer) and a pretrained vision tower (SigLIP, with its image processor) to a VLM that transformers loads.

  data with the pretrained tokenizer (`mmfm data synth/instruct --tokenizer`, <image> added: the embedding grows
  by one row) -> stage 1 at tp=2: projector alignment, tower and LM frozen, both imported from their folders ->
  SFT -> `mmfm export` -> transformers: logits equal mmfm's, greedy generation token-identical to
  `mmfm generate` on the run and on the exported folder.

Tolerance (fp32 logits, max abs diff <= 1e-4): as tests/test_hf_vlm.py argues, the same math in another order,
~1e-6 measured; a wrong mapping moves logits by > 1e-2.
"""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import STEPS
from mmfm.checkpoint import CheckpointManager
from mmfm.cli.export import parse_args as export_args
from mmfm.cli.export import run as export
from mmfm.cli.generate import parse_args as generate_args
from mmfm.cli.generate import run as generate
from mmfm.cli.main import main as mmfm
from mmfm.config import load_config
from mmfm.models import build_model
from mmfm.train.trainer import Trainer, stage_checkpoint
from parallel_runs import run_layout
from test_hf_tokenizer import save_tokenizer

import transformers  # noqa: E402  (the dev extra installs it: a missing one fails, never skips)
ATOL, NEW_TOKENS = 1e-4, 12


def padded(vocab: int) -> int:
    """The vocabulary (the LM's + <image>) padded to a multiple of 8, so that tensor parallelism divides it; the
    rows past the checkpoint's start at the mean of its rows, and no token ever has those ids."""
    return -(-vocab // 8) * 8


def randomized(model, scale=0.2):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name else torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    """The pretrained folders, the data sets, the two stages' runs and the export."""
    root = tmp_path_factory.mktemp("newcomer")
    lm, tower = root / "qwen2", root / "siglip"
    save_tokenizer(lm, "chatml")  # the LM's folder holds its tokenizer, as on the hub
    vocab = transformers.AutoTokenizer.from_pretrained(lm).__len__()
    randomized(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False))).save_pretrained(lm)
    randomized(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4))).save_pretrained(tower)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tower)
    small = ["--train-size", "128", "--val-size", "16", "--image-size", "32", "--shard-size", "128"]
    assert mmfm(["data", "synth", "--out", str(root / "captions"), "--tokenizer", str(lm), *small]) == 0
    assert mmfm(["data", "instruct", "--out", str(root / "sft"), "--tokenizer", str(lm), *small]) == 0
    manifest = json.loads((root / "captions" / "manifest.json").read_text())
    model = ["model.vision.kind=siglip", "model.vision.image_size=32", "model.vision.patch_size=8",
             "model.vision.hidden_size=32", "model.vision.intermediate_size=64", "model.vision.num_layers=2",
             "model.vision.num_heads=4", "model.vision.stem=patch", "model.language.kind=qwen2", "model.language.qkv_bias=true", f"model.language.vocab_size={padded(vocab + 1)}",
             "model.language.hidden_size=64", "model.language.intermediate_size=128", "model.language.num_layers=2",
             "model.language.num_heads=4", "model.language.num_kv_heads=2", "model.language.max_seq_len=256",
             "model.language.norm_eps=1e-6", "model.language.tie_embeddings=false",
             f"model.image_token_id={manifest['tokenizer']['image_token_id']}", "data.seq_len=160",
             f"data.image.processor={tower}", "data.batch_size=4", *STEPS]
    stage1 = [f"data.path={root / 'captions'}", *model, f"model.pretrained.vision={tower}",
              f"model.pretrained.language={lm}", "stage.freeze=[vision,language]", "parallel.tp=2"]
    run_layout(2, stage1, root / "stage1")
    Trainer(load_config([f"data.path={root / 'sft'}", *model, "stage=sft",
                         f"stage.init_from={root / 'stage1' / 'run'}"]), root / "sft-run").fit()
    export(export_args([str(root / "sft-run"), "--format", "hf", "--out", str(root / "export")]))
    image = root / "scene.png"
    Image.new("RGB", (40, 30), "orange").save(image)
    return {"root": root, "lm": lm, "tower": tower, "vocab": vocab, "model": model, "image": image,
            "stage1": root / "stage1" / "run", "sft": root / "sft-run", "export": root / "export"}


def mmfm_model(run_dir, overrides):
    model = build_model(load_config(overrides).model, "cpu")
    CheckpointManager.load(stage_checkpoint(str(run_dir)), model, no_dist=True)
    return model.eval()


def test_stage_one_trains_only_the_projector_of_imported_parts(path):
    model = mmfm_model(path["stage1"], path["model"])
    lm = transformers.Qwen2ForCausalLM.from_pretrained(path["lm"])
    tower = load_file(str(path["tower"] / "model.safetensors"))
    embedding = lm.model.embed_tokens.weight.detach()
    assert torch.equal(model.language.tok_embeddings.weight[:path["vocab"]], embedding)
    torch.testing.assert_close(model.language.tok_embeddings.weight[path["vocab"]], embedding.double().mean(0).float())
    assert torch.equal(model.language.layers["1"].attention.wq.bias, lm.model.layers[1].self_attn.q_proj.bias)
    patch = next(v for k, v in tower.items() if k.endswith("embeddings.patch_embedding.weight"))
    assert torch.equal(model.vision.patch_embed.weight, patch)
    fresh = build_model(load_config(path["model"]).model, "cpu")
    assert not torch.equal(model.projector.fc1.weight, fresh.projector.fc1.weight)


def batch(vocab):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, vocab, (2, 8), generator=g)
    ids = torch.cat([text[:, :3], torch.full((2, 16), vocab), text[:, 3:]], dim=1)
    return ids, torch.randn(2, 3, 32, 32, generator=g)


@pytest.mark.parametrize("stage", ["stage1", "sft"])
def test_export_loads_in_transformers_with_mmfms_logits(path, tmp_path, stage):
    """The SFT run (one process) and the stage-1 run (trained at tp=2: import -> train -> export round trip)."""
    folder = path["export"] if stage == "sft" else export(export_args([str(path[stage]), "--format", "hf", "--out",
                                                                       str(tmp_path / "export")]))
    ids, pixels = batch(path["vocab"])
    with torch.no_grad():
        ours = mmfm_model(path[stage], path["model"])(ids, pixels)
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
    diff = (ours - theirs).abs().max().item()
    print(f"exported {stage} model: max abs logit diff {diff:.2e}")
    assert diff <= ATOL


def transformers_generate(folder, image, prompt):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\n" + prompt}], tokenize=False,
                                   add_generation_prompt=True).replace("<image>", "<image>" * 16)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    pixels = transformers.SiglipImageProcessor.from_pretrained(folder)(images=Image.open(image),
                                                                       return_tensors="pt").pixel_values
    model = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_generation_is_the_same_in_mmfm_and_transformers(path):
    prompt = "what colour is the object?"
    runs = [generate(generate_args(["--checkpoint", str(p), "--images", str(path["image"]), "--prompt", prompt,
                                    "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"]))[0]["token_ids"]
            for p in (path["sft"], path["export"])]
    theirs = transformers_generate(path["export"], path["image"], prompt)
    print("mmfm run / export / transformers:", runs, theirs)
    eos = transformers.AutoTokenizer.from_pretrained(path["export"]).eos_token_id
    assert runs[0] == runs[1] and runs[0]  # mmfm stops before eos; transformers keeps it
    assert theirs == runs[0] + ([eos] if len(runs[0]) < NEW_TOKENS else [])


@pytest.mark.parametrize("bad,fragment", [
    ("model.pretrained.language={root}", "no config.json"),  # not a Hugging Face model folder
    ("model.pretrained.language={tower}", "model_type='siglip_vision_model' is not a language model"),
    ("model.language.num_layers=3", "model.language.num_layers=3 (checkpoint: 2)"),  # shapes differ
])
def test_bad_pretrained_folders_fail_in_one_line_and_write_nothing(path, tmp_path, bad, fragment):
    from conftest import one_line
    from mmfm.errors import MmfmError

    overrides = [f"data.path={path['root'] / 'captions'}", *path["model"], f"model.pretrained.language={path['lm']}",
                 bad.format(root=path["root"], tower=path["tower"])]
    one_line(MmfmError, lambda: Trainer(load_config(overrides), tmp_path / "run"), fragment)
    assert not (tmp_path / "run").exists()
