"""The llama family's kinds as Hugging Face models: LlamaForCausalLM (kind llama), Qwen2ForCausalLM (qwen2),
Qwen3ForCausalLM (qwen3). Parameter names both ways, and config.json <-> model.language fields.

Plain dicts in and out: no transformers import, and a config.json is data (mmfm.checkpoint.hf reads the
files, refuses custom code, and uses this adapter through the kind's spec, `LanguagePartSpec.hf`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmfm.config.schema import LanguageConfig
from mmfm.models.spec import UnsupportedConfig

ROPE_DEFAULT_THETA = 10000.0  # transformers' default_theta

# Our name (relative to the layer) -> theirs, for every layer.
LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
BIAS_NAMES = {f"attention.w{x}.bias": f"self_attn.{x}_proj.bias" for x in "qkv"}
QK_NORM_NAMES = {"attention.q_norm.weight": "self_attn.q_norm.weight",
                 "attention.k_norm.weight": "self_attn.k_norm.weight"}

# The model.language fields a checkpoint's tensors are sized by (named in shape-mismatch messages).
SIZED_BY = (("embed_tokens", ("vocab_size", "hidden_size")), ("lm_head", ("vocab_size", "hidden_size")),
            ("q_proj", ("num_heads", "head_dim", "hidden_size")), ("o_proj", ("num_heads", "head_dim", "hidden_size")),
            ("k_proj", ("num_kv_heads", "head_dim", "hidden_size")),
            ("v_proj", ("num_kv_heads", "head_dim", "hidden_size")),
            ("_norm.", ("head_dim",)), ("_proj", ("intermediate_size", "hidden_size")), ("norm", ("hidden_size",)))

# The model.language fields that must agree between a model and the checkpoint it loads.
ARCH_FIELDS = ("kind", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
               "head_dim", "tie_embeddings", "qkv_bias", "qk_norm", "norm_eps", "rope_theta", "rope_scaling")
LLAMA3_FIELDS = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_positions")
LLAMA3_KEYS = dict(zip(LLAMA3_FIELDS, ("factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings")))


_REQUIRED = object()


def _get(hf: dict, key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """hf[key] (default when absent), refused unless of the given type (int: no bools; float: also ints)."""
    if key not in hf and default is _REQUIRED:
        raise UnsupportedConfig(f"{key} is missing")
    value = hf.get(key, default)
    types = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, types):
        raise UnsupportedConfig(f"{key}={value!r} is not a{'n' if kind is int else ''} {kind.__name__}")
    return kind(value)


def _rope(hf: dict, layer_types: list) -> dict[str, Any]:
    """The rotary fields, from transformers 5's rope_parameters or 4's rope_theta + rope_scaling."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict) or any(key in layer_types for key in rope):
        raise UnsupportedConfig("rope parameters per layer type are not supported (mmfm uses one rotary setup)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    out = {"rope_theta": _get({**hf, **rope}, "rope_theta", float, ROPE_DEFAULT_THETA), "rope_scaling": "none"}
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UnsupportedConfig(f"partial_rotary_factor={partial!r} is not supported (mmfm rotates whole heads)")
    if rope_type == "llama3":
        # as transformers 5: a top-level original_max_position_embeddings wins, then the rope dict's, then
        # max_position_embeddings
        key = "original_max_position_embeddings"
        rope = {**rope, key: hf[key]} if key in hf else {key: hf.get("max_position_embeddings"), **rope}
        out["rope_scaling"] = "llama3"
        for ours, theirs in LLAMA3_KEYS.items():
            out[ours] = _get(rope, theirs, int if ours == "rope_original_max_positions" else float)
    elif rope_type != "default":
        raise UnsupportedConfig(f"rope_type={rope_type!r} is not supported; mmfm implements 'default' and 'llama3'")
    return out


@dataclass(frozen=True)
class HFLanguageAdapter:
    """One kind's Hugging Face form. defaults: transformers' class defaults for the keys a config.json may
    omit (None: the number of attention heads for num_key_value_heads, hidden_size / heads for head_dim).
    refused: boolean keys this kind cannot express when true; sliding: whether the class has sliding windows."""

    kind: str
    model_type: str
    architecture: str
    qkv_bias: bool
    qk_norm: bool
    defaults: dict = field(default_factory=dict)
    refused: tuple[str, ...] = ()
    sliding: bool = False

    # ---- config.json -> model.language
    def config_from_hf(self, hf: dict) -> dict[str, Any]:
        """model.language field values for a config.json dict; UnsupportedConfig on what this kind lacks."""
        self._check_supported(hf)
        heads = _get(hf, "num_attention_heads", int)
        d = _get(hf, "hidden_size", int)
        kv = hf.get("num_key_value_heads", self.defaults.get("num_key_value_heads"))
        hd = hf.get("head_dim", self.defaults.get("head_dim"))
        fields = {
            "kind": self.kind, "vocab_size": _get(hf, "vocab_size", int), "hidden_size": d,
            "num_layers": _get(hf, "num_hidden_layers", int), "num_heads": heads,
            "num_kv_heads": _get({"num_key_value_heads": heads if kv is None else kv}, "num_key_value_heads", int),
            "intermediate_size": _get(hf, "intermediate_size", int),
            "max_seq_len": _get(hf, "max_position_embeddings", int, self.defaults["max_position_embeddings"]),
            "norm_eps": _get(hf, "rms_norm_eps", float, 1e-6),
            "tie_embeddings": _get(hf, "tie_word_embeddings", bool, False),
            "qkv_bias": self.qkv_bias, "qk_norm": self.qk_norm,
        }
        hd = _get({"head_dim": d // heads if hd is None else hd}, "head_dim", int)
        fields["head_dim"] = 0 if heads * hd == d else hd  # 0: the width split over the heads
        return {**fields, **_rope(hf, self._layer_types(hf))}

    def _check_supported(self, hf: dict) -> None:
        if hf.get("model_type") != self.model_type:
            raise UnsupportedConfig(f"model_type={hf.get('model_type')!r} is not {self.model_type!r}")
        archs = hf.get("architectures")
        if archs is not None and archs != [self.architecture]:
            raise UnsupportedConfig(f"architectures={archs!r}: mmfm reads {self.architecture} checkpoints "
                                    f"(model.* and lm_head weights)")
        if hf.get("quantization_config") is not None:
            raise UnsupportedConfig("quantization_config is set: mmfm reads unquantized weights only")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedConfig(f"hidden_act={act!r} is not supported (mmfm's feed-forward is SwiGLU: silu)")
        for key in self.refused:
            if hf.get(key):
                raise UnsupportedConfig(f"{key}=true is not supported (its extra biases have no place in "
                                        f"model.language.kind={self.kind})")
        sliding = [i for i, t in enumerate(self._layer_types(hf)) if t == "sliding_attention"]
        if sliding and self._window(hf):
            raise UnsupportedConfig(f"layers {sliding[:4]} use sliding-window attention (use_sliding_window / "
                                    "layer_types), which mmfm does not implement")

    def _layer_types(self, hf: dict) -> list:
        """transformers' layer_types (given, or sliding_attention from max_window_layers on when the window is set)."""
        types = hf.get("layer_types")
        if types is not None and not isinstance(types, list):
            raise UnsupportedConfig(f"layer_types={types!r} is not a list")
        if types is not None or not self._window(hf):
            return types or []
        first, layers = hf.get("max_window_layers", 28), hf.get("num_hidden_layers", 0)
        if not isinstance(first, int) or not isinstance(layers, int):
            raise UnsupportedConfig(f"max_window_layers={first!r} / num_hidden_layers={layers!r} are not integers")
        return ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]

    def _window(self, hf: dict) -> bool:
        """Whether the sliding window is set (transformers drops it unless use_sliding_window)."""
        return self.sliding and bool(hf.get("use_sliding_window")) and hf.get("sliding_window") is not None

    # ---- model.language -> config.json
    def config_to_hf(self, lm: LanguageConfig, dtype: str) -> dict[str, Any]:
        """A config.json that transformers' {architecture} loads (read back by config_from_hf unchanged)."""
        rope = {"rope_type": "default"}
        if lm.rope_scaling == "llama3":
            rope = {"rope_type": "llama3", **{theirs: getattr(lm, ours) for ours, theirs in LLAMA3_KEYS.items()}}
        hf = {
            "architectures": [self.architecture], "model_type": self.model_type, "vocab_size": lm.vocab_size,
            "hidden_size": lm.hidden_size, "intermediate_size": lm.intermediate_size,
            "num_hidden_layers": lm.num_layers, "num_attention_heads": lm.num_heads,
            "num_key_value_heads": lm.num_kv_heads, "head_dim": lm.head_dim or lm.hidden_size // lm.num_heads,
            "hidden_act": "silu", "max_position_embeddings": lm.max_seq_len, "rms_norm_eps": lm.norm_eps,
            "tie_word_embeddings": lm.tie_embeddings,
            # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling
            "rope_parameters": {**rope, "rope_theta": lm.rope_theta}, "rope_theta": lm.rope_theta,
            "rope_scaling": rope if lm.rope_scaling == "llama3" else None,
            "dtype": dtype, "torch_dtype": dtype,
        }
        hf.update({key: False for key in self.refused})
        if self.sliding:
            hf["use_sliding_window"] = False
        return hf

    # ---- parameter names
    def names(self, lm: LanguageConfig) -> dict[str, str]:
        """Our parameter name (in LanguageModel) -> the checkpoint's, for the whole model of config lm."""
        per_layer = dict(LAYER_NAMES)
        if lm.qkv_bias:
            per_layer.update(BIAS_NAMES)
        if lm.qk_norm:
            per_layer.update(QK_NORM_NAMES)
        out = {"tok_embeddings.weight": "model.embed_tokens.weight"}
        for i in range(lm.num_layers):
            out.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in per_layer.items()})
        out["norm.weight"] = "model.norm.weight"
        if not lm.tie_embeddings:
            out["output.weight"] = "lm_head.weight"
        return out

    def tied_copies(self, lm: LanguageConfig) -> dict[str, str]:
        """Checkpoint tensors that may be present as copies of another: lm_head when the embedding is tied."""
        return {"lm_head.weight": "model.embed_tokens.weight"} if lm.tie_embeddings else {}

    @staticmethod
    def ignored(name: str) -> bool:
        """Checkpoint tensors that are not weights (old transformers saved the rotary inverse frequencies)."""
        return name.endswith("rotary_emb.inv_freq")

    @staticmethod
    def sized_by(name: str) -> tuple[str, ...]:
        """The model.language fields that size checkpoint tensor `name` (for one-line mismatch messages)."""
        return next((fields for part, fields in SIZED_BY if part in name), ())

    @staticmethod
    def mismatches(model: LanguageConfig, checkpoint: LanguageConfig) -> list[tuple[str, Any, Any]]:
        """(field, model's value, checkpoint's value) for every architecture field that differs."""
        fields = ARCH_FIELDS + (LLAMA3_FIELDS if "llama3" in (model.rope_scaling, checkpoint.rope_scaling) else ())

        def value(lm: LanguageConfig, name: str):
            return (lm.head_dim or lm.hidden_size // lm.num_heads) if name == "head_dim" else getattr(lm, name)

        return [(f, value(model, f), value(checkpoint, f)) for f in fields if value(model, f) != value(checkpoint, f)]


ADAPTERS = {
    "llama": HFLanguageAdapter("llama", "llama", "LlamaForCausalLM", qkv_bias=False, qk_norm=False,
                               defaults={"max_position_embeddings": 2048},
                               refused=("attention_bias", "mlp_bias")),
    "qwen2": HFLanguageAdapter("qwen2", "qwen2", "Qwen2ForCausalLM", qkv_bias=True, qk_norm=False,
                               defaults={"max_position_embeddings": 32768, "num_key_value_heads": 32},
                               sliding=True),
    "qwen3": HFLanguageAdapter("qwen3", "qwen3", "Qwen3ForCausalLM", qkv_bias=False, qk_norm=True,
                               defaults={"max_position_embeddings": 32768, "num_key_value_heads": 32,
                                         "head_dim": 128},
                               refused=("attention_bias",), sliding=True),
}
