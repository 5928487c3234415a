"""The clip family's kinds as Hugging Face models: CLIPVisionModel (kind clip), SiglipVisionModel (kind siglip;
SigLIP2's fixed-resolution checkpoints are SiglipModel too), alone, inside CLIPModel / SiglipModel, or as the
vision tower of LlavaForConditionalGeneration. Parameter names both ways, and config.json <-> model.vision
fields.

Plain dicts in and out: no transformers import, no file reading (mmfm.checkpoint.hf reads the files).

Where the tower's tensors sit depends on the container and on the transformers version that wrote it
(`PREFIXES`; `find_prefix` picks it from a checkpoint's names):

    ""                                  CLIPVisionModel / SiglipVisionModel of transformers 5 (memory and files)
    "vision_model."                     those of 4.x, and CLIPModel / SiglipModel (the Hub's files)
    "vision_tower.vision_model."        LlavaForConditionalGeneration files of 4.x (e.g. llava-hf/llava-1.5-7b-hf)
    "vision_tower."                     LlavaForConditionalGeneration files written by transformers 5
    "model.vision_tower."               LlavaForConditionalGeneration of transformers 5 in memory
    "model.vision_tower.vision_model."  LlavaForConditionalGeneration of transformers 4.5x in memory

Tensors the tower does not build (model.py) are known and skipped: `post_layernorm`, SigLIP's pooling
`head`, the layers after model.vision.feature_layer, and old files' `position_ids` buffer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from mmfm.config.schema import VisionConfig
from mmfm.models.clip.model import LAYOUTS, activation, kept_layers
from mmfm.models.spec import UnsupportedConfig
from mmfm.models.vit.model import mlp_width

PREFIXES = ("", "vision_model.", "vision_tower.vision_model.", "vision_tower.", "model.vision_tower.",
            "model.vision_tower.vision_model.")
PROBE = "embeddings.patch_embedding.weight"  # a tensor every tower has

# Our name (relative to a block) -> theirs (relative to an encoder layer).
LAYER_NAMES = {
    "norm1": "layer_norm1", "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj", "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
# hidden_act -> model.vision.act (gelu_new is the same tanh formula as gelu_pytorch_tanh, written out).
ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}
HF_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}


class UnexpectedTensors(ValueError):
    """Checkpoint tensors of the tower that neither map to a parameter nor are known to be unused."""


def _get(hf: dict, key: str, kind: type, defaults: dict) -> Any:
    """hf[key], or transformers' class default when the file omits it (to_diff_dict drops defaults)."""
    value = hf.get(key, defaults.get(key))
    types = (int, float) if kind is float else (kind,)
    if value is None or isinstance(value, bool) or not isinstance(value, types):
        raise UnsupportedConfig(f"{key}={value!r} is not a{'n' if kind is int else ''} {kind.__name__}")
    return kind(value)


def find_prefix(names: Iterable[str]) -> str:
    """The prefix (one of PREFIXES) of the one vision tower among a checkpoint's tensor names."""
    names = set(names)
    found = [p for p in PREFIXES if p + PROBE in names]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(repr(p) for p in found)})"
        raise UnexpectedTensors(f"{what} CLIP / SigLIP vision tower found (looked for '<prefix>{PROBE}' with "
                                f"a prefix among {list(PREFIXES)}); pass the tower's prefix explicitly")
    return found[0]


@dataclass(frozen=True)
class HFVisionAdapter:
    """One kind's Hugging Face form. defaults: transformers' class defaults for keys a config.json may omit."""

    kind: str
    model_type: str  # of the vision config
    outer_model_type: str  # of the two-tower model holding it (CLIPModel / SiglipModel)
    architecture: str
    defaults: dict

    # ---- config.json -> model.vision
    def config_from_hf(self, hf: dict, feature_layer: Optional[int] = None) -> dict[str, Any]:
        """model.vision field values for a config.json dict: the vision model's, a CLIPModel / SiglipModel's, or
        a LlavaForConditionalGeneration's (whose vision_feature_layer is taken). feature_layer overrides it;
        without either it is -1, the last layer."""
        vision, llava_layer = self._vision_config(hf)
        layer = feature_layer if feature_layer is not None else llava_layer if llava_layer is not None else -1
        act = vision.get("hidden_act", self.defaults["hidden_act"])
        if act not in ACTS:
            raise UnsupportedConfig(f"hidden_act={act!r} is not supported; mmfm implements {sorted(ACTS)}")
        return {
            "kind": self.kind, "image_size": _get(vision, "image_size", int, self.defaults),
            "patch_size": _get(vision, "patch_size", int, self.defaults),
            "num_channels": _get(vision, "num_channels", int, self.defaults),
            "hidden_size": _get(vision, "hidden_size", int, self.defaults),
            "intermediate_size": _get(vision, "intermediate_size", int, self.defaults),
            "num_layers": _get(vision, "num_hidden_layers", int, self.defaults),
            "num_heads": _get(vision, "num_attention_heads", int, self.defaults),
            "norm_eps": _get(vision, "layer_norm_eps", float, self.defaults),
            "act": ACTS[act], "feature_layer": layer, "stem": "patch",
        }

    def _vision_config(self, hf: dict) -> tuple[dict, Optional[int]]:
        """The vision config dict, and LLaVA's feature layer when hf is a LLaVA config."""
        model_type = hf.get("model_type")
        if model_type == self.model_type:
            return hf, None
        if model_type in (self.outer_model_type, "llava"):
            found = vision_model_type(hf)
            if found != self.model_type:
                raise UnsupportedConfig(f"vision_config.model_type={found!r} is not {self.model_type!r} "
                                        f"(kind {self.kind})")
            return hf["vision_config"], self._llava_layer(hf) if model_type == "llava" else None
        if model_type in ("siglip2", "siglip2_vision_model"):
            raise UnsupportedConfig(f"model_type={model_type!r} is SigLIP2's NaFlex variant (patches of any "
                                    "aspect ratio), which mmfm does not implement; use a fixed-resolution SigLIP2 "
                                    "checkpoint (model_type 'siglip')")
        raise UnsupportedConfig(f"model_type={model_type!r} is not {self.model_type!r}, {self.outer_model_type!r} "
                                f"or 'llava' (kind {self.kind})")

    def _llava_layer(self, hf: dict) -> int:
        """vision_feature_layer, refused where mmfm's features would differ from LLaVA's."""
        layer = hf.get("vision_feature_layer", -2)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise UnsupportedConfig(f"vision_feature_layer={layer!r}: mmfm takes one layer's features, not a "
                                    "concatenation of several")
        strategy = hf.get("vision_feature_select_strategy", "default")
        # LLaVA's "default" drops the first token whatever the tower: CLIP's class token, but a real patch of
        # SigLIP (which has none); mmfm keeps exactly the patches, so only these two pairs agree.
        wanted = "default" if LAYOUTS[self.kind].class_token else "full"
        if strategy != wanted:
            raise UnsupportedConfig(f"vision_feature_select_strategy={strategy!r} with a {self.kind} tower: mmfm's "
                                    f"features are the patches alone, which LLaVA gives with {wanted!r}")
        return layer

    # ---- model.vision -> config.json
    def config_to_hf(self, v: VisionConfig) -> dict[str, Any]:
        """The vision config dict of the checkpoint's tower (all num_layers, as transformers builds it)."""
        return {"model_type": self.model_type, "architectures": [self.architecture], "image_size": v.image_size,
                "patch_size": v.patch_size, "num_channels": v.num_channels, "hidden_size": v.hidden_size,
                "intermediate_size": mlp_width(v),
                "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
                "hidden_act": HF_ACTS[activation(v)], "layer_norm_eps": v.norm_eps}

    # ---- parameter names
    def names(self, v: VisionConfig, prefix: str = "") -> dict[str, str]:
        """Our parameter name (in ClipVisionTower) -> the checkpoint's, for the tower of config v."""
        lay = LAYOUTS[self.kind]
        out = {"patch_embed.weight": "embeddings.patch_embedding.weight",
               "pos_embed": "embeddings.position_embedding.weight"}
        if lay.patch_bias:
            out["patch_embed.bias"] = "embeddings.patch_embedding.bias"
        if lay.class_token:
            out["class_embed"] = "embeddings.class_embedding"
        if lay.pre_norm:
            out.update({f"pre_norm.{p}": f"pre_layrnorm.{p}" for p in ("weight", "bias")})
        for i in range(kept_layers(v)):
            for ours, theirs in LAYER_NAMES.items():
                out.update({f"blocks.{i}.{ours}.{p}": f"encoder.layers.{i}.{theirs}.{p}" for p in ("weight", "bias")})
        return {ours: prefix + theirs for ours, theirs in out.items()}

    def skipped(self, v: VisionConfig, prefix: str = "") -> re.Pattern:
        """The checkpoint's tower tensors that the tower does not build (see model.py)."""
        later = "|".join(str(i) for i in range(kept_layers(v), v.num_layers)) or "(?!)"
        return re.compile(re.escape(prefix) + rf"(post_layernorm\.|head\.|embeddings\.position_ids$|"
                                              rf"encoder\.layers\.({later})\.)")

    def tower_names(self, names: Iterable[str], prefix: str = "") -> list[str]:
        """The names of a checkpoint that belong to the tower under prefix."""
        inside = re.compile(re.escape(prefix) + r"(embeddings|pre_layrnorm|encoder|post_layernorm|head)\.")
        return [n for n in names if inside.match(n)]

    def from_hf(self, state: dict, v: VisionConfig, prefix: Optional[str] = None) -> dict:
        """The tower's parameters (our names) from a checkpoint's tensors (theirs; prefix found when None).
        Other models' tensors (a language model, a text tower) are left out; a missing tensor, or one of the
        tower that is neither a parameter nor known to be unused, is refused."""
        prefix = find_prefix(state) if prefix is None else prefix
        names = self.names(v, prefix)
        missing = [theirs for theirs in names.values() if theirs not in state]
        if missing:
            raise UnexpectedTensors(f"{len(missing)} tensors of the model.vision.kind={self.kind} tower are missing, "
                                    f"e.g. {missing[0]!r}; check num_layers / kind against the checkpoint")
        wanted, skipped = set(names.values()), self.skipped(v, prefix)
        extra = [n for n in self.tower_names(state, prefix) if n not in wanted and not skipped.match(n)]
        if extra:
            raise UnexpectedTensors(f"{len(extra)} tensors of the checkpoint's tower have no place in "
                                    f"model.vision.kind={self.kind}, e.g. {extra[0]!r}; check num_layers / kind")
        return {ours: state[theirs] for ours, theirs in names.items()}

    def to_hf(self, state: dict, v: VisionConfig, prefix: str = "") -> dict:
        """The checkpoint's names for the tower's parameters (post_layernorm, the head and the layers after
        the feature layer are not part of it: transformers initializes them afresh)."""
        return {theirs: state[ours] for ours, theirs in self.names(v, prefix).items()}


ADAPTERS = {
    "clip": HFVisionAdapter("clip", "clip_vision_model", "clip", "CLIPVisionModel", defaults={
        "image_size": 224, "patch_size": 32, "num_channels": 3, "hidden_size": 768, "intermediate_size": 3072,
        "num_hidden_layers": 12, "num_attention_heads": 12, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}),
    "siglip": HFVisionAdapter("siglip", "siglip_vision_model", "siglip", "SiglipVisionModel", defaults={
        "image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_size": 768, "intermediate_size": 3072,
        "num_hidden_layers": 12, "num_attention_heads": 12, "layer_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh"}),
}


def vision_model_type(hf: dict) -> Optional[str]:
    """The model_type of the vision tower a config.json describes (the vision model's, a two-tower model's or
    LLaVA's, whose vision_config defaults to CLIP's as in transformers)."""
    outer = hf.get("model_type")
    if outer not in ("llava", "clip", "siglip"):
        return outer
    vision = hf.get("vision_config")
    if not isinstance(vision, dict):
        return None
    return vision.get("model_type", "clip_vision_model" if outer == "llava" else f"{outer}_vision_model")


def adapter_for(hf: dict) -> HFVisionAdapter:
    """The adapter of the tower a config.json describes."""
    model_type = vision_model_type(hf)
    for adapter in ADAPTERS.values():
        if model_type == adapter.model_type:
            return adapter
    if model_type in ("siglip2", "siglip2_vision_model"):
        return ADAPTERS["siglip"]  # whose config_from_hf says why it is refused
    raise UnsupportedConfig(f"model_type={model_type!r} is no CLIP or SigLIP vision tower "
                            f"(known: {sorted(a.model_type for a in ADAPTERS.values())})")
