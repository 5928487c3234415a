"""The VLM as transformers' LlavaForConditionalGeneration, composed from its parts' adapters: the tower's (clip /
siglip: mmfm.models.clip.state_dict_adapter), the language model's (llama / qwen2 / qwen3:
mmfm.models.llama.state_dict_adapter) and the mlp2x_gelu projector's (linear_1 <-> fc1, linear_2 <-> fc2, gelu).

Plain dicts in and out: no transformers import, no file reading (mmfm.checkpoint.hf_vlm reads the files).

Where the tensors sit depends on who wrote them (`LAYOUTS`; `find_layout` picks it from a checkpoint's names):

    files (transformers 4.x, and 5's save_pretrained):  vision_tower[.vision_model].*, multi_modal_projector.*,
                                                        language_model.model.*, language_model.lm_head.weight
    memory (transformers 5's state_dict):               model.vision_tower.*, model.multi_modal_projector.*,
                                                        model.language_model.*, lm_head.weight

mmfm writes the files form with the tower under vision_tower.vision_model. (llava-hf's own files).
"""

from __future__ import annotations

from typing import Any, Iterable

from mmfm.config.schema import ModelConfig
from mmfm.models.clip.state_dict_adapter import ADAPTERS as VISION_ADAPTERS
from mmfm.models.clip.state_dict_adapter import adapter_for
from mmfm.models.llama.state_dict_adapter import ADAPTERS as LANGUAGE_ADAPTERS
from mmfm.models.spec import UnsupportedConfig

ARCHITECTURE = "LlavaForConditionalGeneration"
LLAVA_IMAGE_TOKEN = 32000  # transformers' default image_token_index (LLaVA-1.5's <image>)
PROJECTOR_NAMES = {"fc1": "linear_1", "fc2": "linear_2"}
# name -> (tower, projector, language model, lm_head)
LAYOUTS = {
    "files": ("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.",
              "language_model.lm_head.weight"),
    "files5": ("vision_tower.", "multi_modal_projector.", "language_model.model.", "language_model.lm_head.weight"),
    "memory": ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head.weight"),
}
PROBE = "embeddings.patch_embedding.weight"


def find_layout(names: Iterable[str]) -> str:
    """The LAYOUTS entry whose tower and projector a checkpoint's tensor names hold."""
    names = set(names)
    found = [k for k, (tower, proj, _, _) in LAYOUTS.items() if tower + PROBE in names and proj + "linear_1.weight"
             in names]
    if len(found) != 1:
        raise UnsupportedConfig(f"{'no' if not found else 'more than one'} LLaVA layout found (looked for "
                                f"{[t + PROBE for t, *_ in LAYOUTS.values()]}); is it a LlavaForConditionalGeneration?")
    return found[0]


def _text_config(hf: dict) -> dict:
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise UnsupportedConfig("text_config is missing; a LLaVA config.json holds the language model's config there")
    return {"model_type": "llama", **text}  # transformers' LlavaConfig defaults the text model to Llama


def language_adapter(text: dict):
    model_type = text.get("model_type")
    adapter = next((a for a in LANGUAGE_ADAPTERS.values() if a.model_type == model_type), None)
    if adapter is None:
        raise UnsupportedConfig(f"text_config.model_type={model_type!r} is not a language model mmfm builds "
                                f"(supported: {sorted(a.model_type for a in LANGUAGE_ADAPTERS.values())})")
    return adapter


def config_from_hf(hf: dict) -> dict[str, Any]:
    """ModelConfig field values (vision, language as dicts; projector kind; image_token_id) for a LLaVA
    config.json; UnsupportedConfig (naming the key) on what mmfm cannot express."""
    if hf.get("model_type") != "llava":
        raise UnsupportedConfig(f"model_type={hf.get('model_type')!r} is not 'llava'")
    archs = hf.get("architectures")
    if archs is not None and archs != [ARCHITECTURE]:
        raise UnsupportedConfig(f"architectures={archs!r}: mmfm reads {ARCHITECTURE} checkpoints")
    if hf.get("quantization_config") is not None:
        raise UnsupportedConfig("quantization_config is set: mmfm reads unquantized weights only")
    act = hf.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise UnsupportedConfig(f"projector_hidden_act={act!r}: model.projector.kind=mlp2x_gelu uses gelu (erf)")
    if hf.get("multimodal_projector_bias", True) is not True:
        raise UnsupportedConfig("multimodal_projector_bias=false: mlp2x_gelu's linear layers have biases")
    vision = adapter_for(hf).config_from_hf(hf)  # vision_feature_layer (one int) and the select strategy
    text = _text_config(hf)
    language = language_adapter(text).config_from_hf({k: v for k, v in text.items() if k != "architectures"})
    if "tie_word_embeddings" in hf:  # the outer model's flag is the one transformers ties by
        language["tie_embeddings"] = hf["tie_word_embeddings"] is True
    token = hf.get("image_token_index", LLAVA_IMAGE_TOKEN)
    if isinstance(token, bool) or not isinstance(token, int):
        raise UnsupportedConfig(f"image_token_index={token!r} is not an int")
    return {"vision": vision, "projector": {"kind": "mlp2x_gelu"}, "language": language, "image_token_id": token}


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """A LLaVA config.json that transformers loads (read back by config_from_hf unchanged)."""
    if cfg.vision.kind not in VISION_ADAPTERS:
        raise UnsupportedConfig(f"model.vision.kind={cfg.vision.kind} has no Hugging Face form (LLaVA's tower is "
                                f"one of {sorted(VISION_ADAPTERS)})")
    vision = VISION_ADAPTERS[cfg.vision.kind]
    text = LANGUAGE_ADAPTERS[cfg.language.kind].config_to_hf(cfg.language, dtype)
    text.pop("architectures")
    return {"architectures": [ARCHITECTURE], "model_type": "llava", "dtype": dtype, "torch_dtype": dtype,
            "vision_config": vision.config_to_hf(cfg.vision), "text_config": text,
            "image_token_index": cfg.image_token_id, "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True, "vision_feature_layer": cfg.vision.feature_layer,
            # the features are exactly the patches: LLaVA drops CLIP's class token ("default"), keeps SigLIP's all
            "vision_feature_select_strategy": "default" if cfg.vision.kind == "clip" else "full",
            "image_seq_length": (cfg.vision.image_size // cfg.vision.patch_size) ** 2,
            "tie_word_embeddings": cfg.language.tie_embeddings}


def names(cfg: ModelConfig, layout: str = "files") -> dict[str, str]:
    """Our parameter name (in VisionLanguageModel) -> the checkpoint's, for the whole VLM."""
    tower, proj, lm, head = LAYOUTS[layout]
    out = {f"vision.{ours}": theirs for ours, theirs in VISION_ADAPTERS[cfg.vision.kind].names(cfg.vision, tower).items()}
    for ours, theirs in PROJECTOR_NAMES.items():
        out.update({f"projector.{ours}.{p}": f"{proj}{theirs}.{p}" for p in ("weight", "bias")})
    for ours, theirs in LANGUAGE_ADAPTERS[cfg.language.kind].names(cfg.language).items():
        out[f"language.{ours}"] = _language_name(theirs, lm, head)
    return out


def _language_name(theirs: str, lm: str, head: str) -> str:
    return head if theirs == "lm_head.weight" else lm + theirs.removeprefix("model.")


def tied_copies(cfg: ModelConfig, layout: str = "files") -> dict[str, str]:
    _, _, lm, head = LAYOUTS[layout]
    return {_language_name(a, lm, head): _language_name(b, lm, head)
            for a, b in LANGUAGE_ADAPTERS[cfg.language.kind].tied_copies(cfg.language).items()}


def ignored(cfg: ModelConfig, layout: str = "files"):
    """Checkpoint tensors that are not weights of the VLM: the tower's unused ones, old rotary buffers."""
    skipped = VISION_ADAPTERS[cfg.vision.kind].skipped(cfg.vision, LAYOUTS[layout][0])
    return lambda name: bool(skipped.match(name)) or LANGUAGE_ADAPTERS[cfg.language.kind].ignored(name)
