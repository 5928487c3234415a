"""The VLM against transformers' LlavaForConditionalGeneration: tiny random LLaVAs (CLIP tower + Llama, SigLIP tower
+ Qwen2) in fp32, imported through model.pretrained (whole, or parts from their own folders), exported back with
`mmfm export`, and refused (one line, nothing written) where mmfm cannot express them.

Inputs: LLaVA's image token is image_token_index (32000 in LLaVA-1.5; 100 here, inside the tiny vocabulary), and
transformers expects exactly as many placeholders per image as the tower gives features: the patches,
(32 / 8)^2 = 16 (CLIP's class token is dropped by the "default" strategy; SigLIP has none, "full"), which is
also mmfm's tokens_per_image.

Tolerance of the logit comparisons, max abs diff <= 1e-4 (fp32): both sides compute the same math in a different
order (eager vs SDPA attention, LayerNorm / GELU calls), a few ulps per op; over the 3 tower layers, the projector
and 2 decoder layers that is ~1e-6 on logits of magnitude ~1 (the measured value is printed). A wrong mapping
moves them by far more: every weight here is random (transformers' ones and zeros would hide an unloaded norm
or bias), and the image positions carry the tower's features, so a swapped projector layer, a wrong feature
layer or a kept class token shifts them by >1e-2.
"""

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from transformers import (AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast,
                          Qwen2Config, SiglipVisionConfig)

from conftest import one_line
from mmfm.checkpoint import CheckpointManager
from mmfm.checkpoint.hf import HFCheckpointError
from mmfm.checkpoint.hf_vlm import load_pretrained, model_config_from_hf
from mmfm.cli.export import parse_args, run
from mmfm.config.schema import JobConfig
from mmfm.config.validate import _validate_pretrained
from mmfm.errors import ConfigError
from mmfm.models import build_model

ATOL = 1e-4
IMAGE_TOKEN, VOCAB, PER_IMAGE = 100, 128, 16
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4)
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128)
CASES = {"clip-llama": (CLIPVisionConfig, LlamaConfig, "default"),
         "siglip-qwen2": (SiglipVisionConfig, Qwen2Config, "full")}


@torch.no_grad()
def randomize(model):
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name else torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def hf_llava(case: str):
    vision, text, strategy = CASES[case]
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=vision(**VISION), text_config=text(**TEXT, tie_word_embeddings=False),
                         image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                         vision_feature_select_strategy=strategy, tie_word_embeddings=False)
    return randomize(LlavaForConditionalGeneration(config))


def save_llavas(root) -> dict:
    """case -> (folder, transformers model), saved by save_pretrained in fp32."""
    out = {}
    for case in CASES:
        model = hf_llava(case)
        model.save_pretrained(root / case)
        out[case] = (root / case, model)
    return out


@pytest.fixture(scope="module")
def llavas(tmp_path_factory):
    return save_llavas(tmp_path_factory.mktemp("llava"))


def batch():
    """Two samples, one image each: 3 text tokens, the image's 16 placeholders, 5 text tokens."""
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, IMAGE_TOKEN, (2, 8), generator=g)
    ids = torch.cat([text[:, :3], torch.full((2, PER_IMAGE), IMAGE_TOKEN), text[:, 3:]], dim=1)
    return ids, torch.randn(2, 3, 32, 32, generator=g)


def hf_logits(model):
    ids, pixels = batch()
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


def mmfm_logits(model):
    ids, pixels = batch()
    with torch.no_grad():
        return model(ids, pixels)


def imported(cfg):
    model = build_model(cfg, "cpu")
    assert load_pretrained(model, cfg)
    return model.eval()


def vlm_config(folder):
    cfg = model_config_from_hf(folder)
    cfg.pretrained.vlm = str(folder)
    return cfg


# ---------------------------------------------------------------- equal to transformers


@pytest.mark.parametrize("case", list(CASES))
def test_vlm_logits_equal_transformers(llavas, case):
    folder, hf = llavas[case]
    cfg = vlm_config(folder)
    assert cfg.image_token_id == IMAGE_TOKEN and cfg.vision.feature_layer == -2
    model = imported(cfg)
    assert model.tokens_per_image == PER_IMAGE
    diff = (mmfm_logits(model) - hf_logits(hf)).abs().max().item()
    print(f"{case}: max abs logit diff {diff:.2e}")
    assert diff <= ATOL
    # the image positions matter: without the image the logits after it move far beyond the tolerance
    ids, _ = batch()
    with torch.no_grad():
        blind = model.language(model.language.embed(ids))
    assert (blind - mmfm_logits(model))[:, 3 + PER_IMAGE:].abs().max() > 100 * ATOL
    # and a mapping error there shows: linear_1 and linear_2 swapped (both 32 x 32 here)
    with torch.no_grad():
        a, b = model.projector.fc1.weight.clone(), model.projector.fc2.weight.clone()
        model.projector.fc1.weight.copy_(b)
        model.projector.fc2.weight.copy_(a)
    assert (mmfm_logits(model) - hf_logits(hf)).abs().max() > 100 * ATOL


def test_parts_import_equals_vlm_import(llavas, tmp_path):
    folder, hf = llavas["clip-llama"]
    vision = CLIPVisionModel(hf.config.vision_config)
    vision.load_state_dict(hf.model.vision_tower.state_dict())
    vision.save_pretrained(tmp_path / "clip")
    lm = LlamaForCausalLM(hf.config.text_config)
    lm.load_state_dict({**{f"model.{k}": v for k, v in hf.model.language_model.state_dict().items()},
                        "lm_head.weight": hf.lm_head.weight})
    lm.save_pretrained(tmp_path / "llama")
    whole = imported(vlm_config(folder))
    cfg = model_config_from_hf(folder)
    cfg.pretrained.vision, cfg.pretrained.language = str(tmp_path / "clip"), str(tmp_path / "llama")
    parts = imported(cfg)
    fresh = build_model(model_config_from_hf(folder), "cpu")
    for name, p in parts.state_dict().items():
        want = (fresh if name.startswith("projector.") else whole).state_dict()[name]
        assert torch.equal(p, want), name
    assert not torch.equal(parts.projector.fc1.weight, whole.projector.fc1.weight)


def save_word_tokenizer(folder, image_id: int):
    """A pretrained-style tokenizer (tokenizer.json + tokenizer_config.json with a ChatML template) whose <image>
    is image_id: words w0.. below it, then <image>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|im_start|>": 0, "<|im_end|>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, image_id)}}
    word = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    word.add_special_tokens(["<|im_start|>", "<|im_end|>", "<image>"])
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    PreTrainedTokenizerFast(tokenizer_object=word, eos_token="<|im_end|>", unk_token="<unk>",
                            chat_template=template).save_pretrained(folder)


def saved_run(tmp_path, cfg):
    """A run directory as `mmfm train` leaves it: config.yaml, the tokenizer and one checkpoint of a model of
    config cfg."""
    run_dir = tmp_path / "run"
    job = JobConfig(model=cfg)
    model = imported(cfg) if cfg.pretrained.vlm else build_model(cfg, "cpu")
    run_dir.mkdir()
    save_word_tokenizer(run_dir, cfg.image_token_id)
    OmegaConf.save(OmegaConf.structured(job), run_dir / "config.yaml")
    CheckpointManager(run_dir / "checkpoints").save(1, model, torch.optim.AdamW(model.parameters()),
                                                    {"scheduler": {}, "data": []})
    return run_dir


@pytest.mark.parametrize("case", list(CASES))
def test_export_round_trip(llavas, tmp_path, case):
    folder, hf = llavas[case]
    run_dir = saved_run(tmp_path, vlm_config(folder))
    out = run(parse_args([str(run_dir), "--format", "hf", "--out", str(tmp_path / "out")]))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["image_token_index"] == IMAGE_TOKEN
    back = LlavaForConditionalGeneration.from_pretrained(out).eval()
    diff = (hf_logits(back) - hf_logits(hf)).abs().max().item()
    print(f"{case}: exported max abs logit diff {diff:.2e}")
    assert diff <= ATOL
    # The tokenizer (with its chat template) and the image processor come along
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN and tokenizer.chat_template
    processor = AutoImageProcessor.from_pretrained(out)
    assert list(processor.image_mean) == [0.5, 0.5, 0.5] and processor.size == {"height": 32, "width": 32}
    lm_out = run(parse_args([str(run_dir), "--format", "hf", "--out", str(tmp_path / "lm"), "--language-only"]))
    lm_config = json.loads((lm_out / "config.json").read_text())
    assert lm_config["num_hidden_layers"] == 2 and lm_config["architectures"][0].endswith("ForCausalLM")


# ---------------------------------------------------------------- refused


def job_with(**pretrained):
    job = JobConfig()
    for key, value in pretrained.items():
        setattr(job.model.pretrained, key, str(value))
    return job


def test_folder_without_config_is_refused(llavas, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(llavas["clip-llama"][0], bare)
    (bare / "config.json").unlink()
    one_line(ConfigError, lambda: _validate_pretrained(job_with(vlm=bare)), "model.pretrained", "no config.json")


def test_mismatching_config_is_refused(llavas):
    folder = llavas["clip-llama"][0]
    job = JobConfig(model=vlm_config(folder))
    job.model.language.num_layers = 3
    one_line(ConfigError, lambda: _validate_pretrained(job), "model.language.num_layers=3 (checkpoint: 2)")
    with pytest.raises(HFCheckpointError, match="num_layers"):
        load_pretrained(build_model(job.model, "cpu"), job.model)


@pytest.mark.parametrize("key,value,fragment", [
    ("projector_hidden_act", "relu", "projector_hidden_act='relu'"),
    ("vision_feature_layer", [-2, -5], "not a concatenation"),
    ("multimodal_projector_bias", False, "multimodal_projector_bias=false"),
])
def test_inexpressible_llava_is_refused(llavas, tmp_path, key, value, fragment):
    bad = tmp_path / "bad"
    shutil.copytree(llavas["clip-llama"][0], bad)
    config = json.loads((bad / "config.json").read_text())
    config[key] = value
    (bad / "config.json").write_text(json.dumps(config))
    one_line(HFCheckpointError, lambda: model_config_from_hf(bad), fragment)


def test_vit_tower_export_is_refused(tmp_path):
    cfg = JobConfig().model
    cfg.vision.hidden_size, cfg.language.num_layers = 32, 1
    run_dir = saved_run(tmp_path, cfg)
    out = tmp_path / "out"
    one_line(HFCheckpointError, lambda: run(parse_args([str(run_dir), "--format", "hf", "--out", str(out)])),
             "model.vision.kind=vit has no Hugging Face form", "--language-only")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_parallelize_loads_pretrained(llavas):
    """The hook where the model is materialized: parallelize (one process, no mesh) fills model.pretrained."""
    from mmfm.parallel.dims import ParallelDims
    from mmfm.parallel.parallelize import parallelize

    folder, hf = llavas["clip-llama"]
    job = JobConfig(model=vlm_config(folder))
    parts = parallelize(job, ParallelDims(), torch.device("cpu"))
    diff = (mmfm_logits(parts.parts[0].eval()) - hf_logits(hf)).abs().max().item()
    assert diff <= ATOL


@pytest.mark.parametrize("tower", ["siglip", "vit"])
def test_model_trained_from_scratch_exports_to_transformers(synth_dir, tmp_path, tower):
    """A small model trained from scratch on the synthetic data (3 steps), exported with its own tokenizer: with
    tiny_llava's SigLIP tower as LLaVA (mmfm's tokenizer and markers template included), with the demo's tiny_vlm
    `vit` tower (no transformers class) as the language model alone. transformers' logits equal mmfm's."""
    from mmfm.config import load_config
    from mmfm.train.trainer import Trainer, stage_checkpoint
    from conftest import SMALL_MODEL, STEPS

    towers = {"siglip": ["model=tiny_llava"], "vit": []}
    overrides = [f"data.path={synth_dir}", *towers[tower], *SMALL_MODEL, *STEPS, "model.vision.image_size=32", "model.vision.patch_size=8"]
    Trainer(load_config(overrides), tmp_path / "run").fit()
    cfg = load_config(overrides).model
    model = build_model(cfg, "cpu")
    CheckpointManager.load(stage_checkpoint(str(tmp_path / "run")), model, no_dist=True)
    ids, pixels = batch()
    ids = torch.where(ids == IMAGE_TOKEN, cfg.image_token_id, ids.clamp(min=4))  # text ids past the specials
    args = [str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "out")]
    with torch.no_grad():
        if tower == "vit":
            out = run(parse_args([*args, "--language-only"]))
            ours = model.language(model.language.embed(ids))
            theirs = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        else:
            out = run(parse_args(args))
            ours = model.eval()(ids, pixels)
            theirs = LlavaForConditionalGeneration.from_pretrained(out).eval()(input_ids=ids, pixel_values=pixels).logits
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<image>") == cfg.image_token_id
    assert (ours - theirs).abs().max().item() <= ATOL
