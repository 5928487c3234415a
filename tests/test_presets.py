"""The real-shape presets of mmfm/configs/model/ against transformers' LlavaForConditionalGeneration, all on the meta
device (no weights, no downloads: the checkpoints' public config.json values are written below, each under the
name of the checkpoint it comes from).

Each preset counts exactly what transformers builds for the same configs less the tower's unused tail, which mmfm
does not build (mmfm/models/clip/model.py): the layers after the feature layer, post_layernorm and SigLIP's
attention-pooling head. The tail is summed from transformers' own modules, not from a formula.
"""

import functools

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from mmfm.config import ConfigError, image_tokens, load_config, validate
from mmfm.config.schema import LanguageConfig, VisionConfig
from mmfm.models import build_model, model_spec
from mmfm.models.vlm.state_dict_adapter import config_from_hf, config_to_hf
from mmfm.parallel.dims import ParallelDims

# google/siglip-so400m-patch14-384, config.json's vision_config
SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                     num_attention_heads=16, patch_size=14, image_size=384, num_channels=3,
                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# openai/clip-vit-large-patch14-336, config.json's vision_config
CLIP_L336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, patch_size=14, image_size=336, num_channels=3, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5)
QWEN2 = dict(model_type="qwen2", hidden_act="silu", rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
             use_sliding_window=False)
# Qwen/Qwen2.5-7B
QWEN25_7B = dict(QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072)
# Qwen/Qwen1.5-110B
QWEN15_110B = dict(QWEN2, vocab_size=152064, hidden_size=8192, intermediate_size=49152, num_hidden_layers=80,
                   num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=32768)
# meta-llama/Llama-3.1-8B, its vocabulary grown by the <image> row mmfm adds at 128256 (install_tokenizer)
LLAMA31_8B = dict(model_type="llama", vocab_size=128256 + 1, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                  max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192))

# preset -> (vision_config, text_config, image_token_index, select strategy, image tokens)
PRESETS = {
    "llava_qwen2_7b": (SIGLIP_SO400M, QWEN25_7B, 151665, "full", 729),
    "llava_llama3_8b": (CLIP_L336, LLAMA31_8B, 128256, "default", 576),
    "llava_qwen15_110b": (SIGLIP_SO400M, QWEN15_110B, 151646, "full", 729),
}


def preset(name: str):
    cfg = load_config([f"model={name}", "data.seq_len=2048"])
    validate(cfg)
    return cfg


def llava_config(name: str) -> dict:
    """The LLaVA config.json transformers writes for the checkpoints' configs (features of layer -2)."""
    vision, text, token, strategy, _ = PRESETS[name]
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=token, vision_feature_layer=-2,
                       vision_feature_select_strategy=strategy).to_dict()


def llava_on_meta(hf: dict) -> LlavaForConditionalGeneration:
    with torch.device("meta"):
        return LlavaForConditionalGeneration(LlavaConfig(**hf))


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.cache
def transformers_counts(name: str) -> tuple[int, int, int]:
    """(transformers' LLaVA, its tower's unused tail, the features' tokens per image from its own forward)."""
    hf = llava_config(name)
    model = llava_on_meta(hf)
    tower = model.model.vision_tower
    kept = hf["vision_config"]["num_hidden_layers"] + 1 + hf["vision_feature_layer"]  # hidden_states[i]: layer i
    tail = [*tower.encoder.layers[kept:], tower.post_layernorm, getattr(tower, "head", None)]
    size = hf["vision_config"]["image_size"]
    features = model.model.get_image_features(pixel_values=torch.empty(1, 3, size, size, device="meta"))
    return count(model), sum(count(m) for m in tail if m is not None), features.pooler_output[0].shape[0]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_counts_what_transformers_builds_less_the_unused_tail(name):
    cfg = preset(name)
    model = build_model(cfg.model, "meta")
    theirs, tail, tokens = transformers_counts(name)
    assert count(model) == model_spec(cfg.model).num_params(cfg.model) == theirs - tail
    assert model.tokens_per_image == image_tokens(cfg) == tokens == PRESETS[name][4]
    assert len(model.vision.blocks) == cfg.model.vision.num_layers - 1  # feature_layer -2


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_the_checkpoints_config_and_round_trips(name):
    m = preset(name).model
    theirs = config_from_hf(llava_config(name))  # what mmfm reads from the public configs
    assert VisionConfig(**theirs["vision"]) == m.vision and theirs["image_token_id"] == m.image_token_id
    assert LanguageConfig(**{**theirs["language"], "max_seq_len": m.language.max_seq_len}) == m.language
    hf = config_to_hf(m, "bfloat16")
    back = config_from_hf(hf)
    assert (VisionConfig(**back["vision"]), LanguageConfig(**back["language"])) == (m.vision, m.language)
    assert back["image_token_id"] == m.image_token_id
    assert count(llava_on_meta(hf)) == transformers_counts(name)[0]


def test_110b_preset_is_over_100b_and_the_layouts_tp_allows():
    cfg = preset("llava_qwen15_110b")
    assert model_spec(cfg.model).num_params(cfg.model) >= 100e9
    ParallelDims(tp=8).validate(cfg.model)
    ParallelDims(tp=4).validate(preset("llava_qwen2_7b").model)
    with pytest.raises(ConfigError, match="num_heads=28 is not divisible by parallel.tp=8"):
        ParallelDims(tp=8).validate(preset("llava_qwen2_7b").model)
    llama3 = load_config(["model=llava_llama3_8b"]).model
    with pytest.raises(ConfigError, match="vocab_size=128257 is not divisible by parallel.tp=2"):
        ParallelDims(tp=2).validate(llama3)
    padded = load_config(["model=llava_llama3_8b", "model.language.vocab_size=128264"]).model
    ParallelDims(tp=8).validate(padded)
