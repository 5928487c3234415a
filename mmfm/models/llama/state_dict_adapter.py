"""The llama family's kinds as Hugging Face models: LlamaForCausalLM (kind llama), Qwen2ForCausalLM (qwen2),
Qwen3ForCausalLM (qwen3). Parameter names both ways, and config.json <-> model.language fields.

Plain dicts in and out: no transformers import, and a config.json is data (mmfm.checkpoint.hf reads the
files, refuses custom code, and uses this adapter through the kind's spec, `LanguagePartSpec.hf`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from mmfm.config.schema import LanguageConfig, MoEConfig
from mmfm.models.moe import is_moe_layer
from mmfm.models.spec import Stacked, UnsupportedConfig

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
    moe: Optional["HFLanguageAdapter"] = None  # the kind's mixture-of-experts form (Qwen3-MoE for qwen3)

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


# The model.language.moe fields that must agree between a model and the checkpoint it loads.
MOE_ARCH_FIELDS = ("num_experts", "top_k", "expert_intermediate_size", "num_shared_experts", "score_func",
                   "normalize_weights", "route_scale", "num_groups", "topk_groups", "first_dense_layers", "every")
EXPERT_NAMES = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))  # ours -> each expert's Linear


def _sparse_layers(hf: dict, layers: int) -> list[int]:
    """transformers' Qwen3-MoE placement: layer i is sparse unless in mlp_only_layers, when (i + 1) is a multiple
    of decoder_sparse_step."""
    step = _get(hf, "decoder_sparse_step", int, 1)
    dense = hf.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise UnsupportedConfig(f"mlp_only_layers={dense!r} is not a list of layer indices")
    if step < 1:
        raise UnsupportedConfig(f"decoder_sparse_step={step} must be >= 1")
    return [i for i in range(layers) if i not in dense and (i + 1) % step == 0]


@dataclass(frozen=True)
class HFMoEAdapter(HFLanguageAdapter):
    """Qwen3MoeForCausalLM: qwen3 decoder layers whose feed-forward is a mixture of experts (softmax top-k over the
    router's logits, optionally renormalized, no shared experts), each expert a SwiGLU of three nn.Linear saved one
    tensor per expert (mlp.experts.<e>.gate_proj/up_proj/down_proj), the router mlp.gate."""

    def config_from_hf(self, hf: dict) -> dict[str, Any]:
        fields = super().config_from_hf(hf)
        # the published configs say num_experts; transformers 5 writes it as num_local_experts
        key = "num_experts" if "num_experts" in hf else "num_local_experts"
        experts, top_k = _get(hf, key, int), _get(hf, "num_experts_per_tok", int)
        sparse = _sparse_layers(hf, fields["num_layers"])
        if experts < 1 or not sparse:
            raise UnsupportedConfig(f"num_experts={experts} leaves no mixture-of-experts layer; a dense checkpoint "
                                    "is model_type qwen3")
        first, every = sparse[0], (sparse[1] - sparse[0] if len(sparse) > 1 else 1)
        if sparse != list(range(first, fields["num_layers"], every)):
            raise UnsupportedConfig(f"experts on layers {sparse[:6]}: mmfm places them on every n-th layer from "
                                    "the first sparse one on (moe.first_dense_layers, moe.every)")
        normalize = _get(hf, "norm_topk_prob", bool, False)
        if normalize and top_k == 1:
            raise UnsupportedConfig("norm_topk_prob=true with num_experts_per_tok=1 (a constant weight of 1) is not "
                                    "supported")
        moe = MoEConfig(num_experts=experts, top_k=top_k,
                        expert_intermediate_size=_get(hf, "moe_intermediate_size", int),
                        normalize_weights=normalize, first_dense_layers=first, every=every,
                        aux_loss_coef=_get(hf, "router_aux_loss_coef", float, 0.001))
        return {**fields, "moe": moe}

    def inexpressible(self, lm: LanguageConfig) -> str:
        """Why Qwen3-MoE cannot hold a model of config lm ("" when it can)."""
        moe = lm.moe
        layers = [i for i in range(lm.num_layers) if is_moe_layer(lm, i)]
        step = moe.every if layers else 1
        for bad, why in ((moe.num_shared_experts, f"num_shared_experts={moe.num_shared_experts}"),
                         (moe.score_func != "softmax", f"score_func={moe.score_func}"),
                         (moe.num_groups > 1, f"num_groups={moe.num_groups}"),
                         (moe.route_scale != 1.0, f"route_scale={moe.route_scale}"),
                         (moe.bias_update_rate > 0, f"bias_update_rate={moe.bias_update_rate} (a routing bias)"),
                         (any((i + 1) % step for i in layers),
                          f"experts from layer {moe.first_dense_layers} every {step}: Qwen3-MoE's sparse layers are "
                          f"those i with (i + 1) a multiple of decoder_sparse_step")):
            if bad:
                return f"{why} has no place in Qwen3MoeForCausalLM"
        return ""

    def config_to_hf(self, lm: LanguageConfig, dtype: str) -> dict[str, Any]:
        moe, step = lm.moe, lm.moe.every
        hf = super().config_to_hf(lm, dtype)
        hf.update({
            "num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": moe.expert_intermediate_size or lm.intermediate_size,
            "norm_topk_prob": moe.normalize_weights and moe.top_k > 1, "decoder_sparse_step": step,
            "mlp_only_layers": [i for i in range(lm.num_layers) if (i + 1) % step == 0 and not is_moe_layer(lm, i)],
            "router_aux_loss_coef": moe.aux_loss_coef, "output_router_logits": False})
        return hf

    def names(self, lm: LanguageConfig) -> dict[str, Any]:
        out = super().names(lm)
        for i in (i for i in range(lm.num_layers) if is_moe_layer(lm, i)):
            for ours, theirs in EXPERT_NAMES:
                del out[f"layers.{i}.feed_forward.{ours}.weight"]
                out[f"layers.{i}.feed_forward.experts.{ours}"] = Stacked(tuple(
                    f"model.layers.{i}.mlp.experts.{e}.{theirs}.weight" for e in range(lm.moe.num_experts)))
            out[f"layers.{i}.feed_forward.router.gate.weight"] = f"model.layers.{i}.mlp.gate.weight"
        return out

    @staticmethod
    def sized_by(name: str) -> tuple[str, ...]:
        if ".mlp.experts." in name or ".mlp.gate." in name:
            return ("hidden_size",)  # and model.language.moe's sizes
        return HFLanguageAdapter.sized_by(name)

    @staticmethod
    def mismatches(model: LanguageConfig, checkpoint: LanguageConfig) -> list[tuple[str, Any, Any]]:
        dense = HFLanguageAdapter.mismatches(model, checkpoint)
        return dense + [(f"moe.{f}", getattr(model.moe, f), getattr(checkpoint.moe, f)) for f in MOE_ARCH_FIELDS
                        if getattr(model.moe, f) != getattr(checkpoint.moe, f)]


QWEN3_MOE = HFMoEAdapter("qwen3", "qwen3_moe", "Qwen3MoeForCausalLM", qkv_bias=False, qk_norm=True,
                         defaults={"max_position_embeddings": 32768, "num_key_value_heads": 4},
                         refused=("attention_bias",), sliding=True)

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
                               refused=("attention_bias",), sliding=True, moe=QWEN3_MOE),
}
