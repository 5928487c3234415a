"""The llama family: Llama-style decoders (RMSNorm, rotary, grouped-query attention, SwiGLU).

Three kinds share its code path and differ by model.language flags, which each kind's checks require:
llama (neither), qwen2 (qkv_bias: biases on q, k, v), qwen3 (qk_norm: RMSNorm over each head's q and k).
Each also has its Hugging Face form (state_dict_adapter)."""

from __future__ import annotations

import dataclasses

from mmfm.config.checks import positive, require
from mmfm.config.schema import ModelConfig
from mmfm.models.llama import counts, parallelize
from mmfm.models.llama.model import KVCache, LanguageModel, head_dim
from mmfm.models.llama.state_dict_adapter import ADAPTERS
from mmfm.models.moe import validate_moe
from mmfm.models.spec import LanguagePartSpec, register_part

ROPE_SCALINGS = ("none", "llama3")


def _check_shapes(cfg: ModelConfig) -> None:
    lm = cfg.language
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        positive(f"model.language.{key}", getattr(lm, key))
    if lm.mla.kv_lora_rank:
        return _check_mla(lm)
    require(lm.head_dim >= 0, f"model.language.head_dim={lm.head_dim} must be >= 0 (0: hidden_size / num_heads)")
    require(lm.head_dim > 0 or lm.hidden_size % lm.num_heads == 0,
            f"model.language.hidden_size={lm.hidden_size} is not divisible by "
            f"model.language.num_heads={lm.num_heads}; change one so that hidden_size % num_heads == 0, or set "
            "model.language.head_dim")
    require(lm.num_heads % lm.num_kv_heads == 0,
            f"model.language.num_kv_heads={lm.num_kv_heads} does not divide model.language.num_heads="
            f"{lm.num_heads}; grouped-query attention needs num_heads % num_kv_heads == 0")
    require(head_dim(lm) % 2 == 0,
            f"model.language head size {head_dim(lm)} is odd; rotary embeddings need an even head size "
            "(model.language.head_dim, or hidden_size / num_heads when it is 0)")


def _check_mla(lm) -> None:
    mla, p = lm.mla, "model.language.mla"
    for key in ("q_lora_rank", "qk_nope_head_dim"):
        require(getattr(mla, key) >= 0, f"{p}.{key}={getattr(mla, key)} must be >= 0")
    for key in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
        positive(f"{p}.{key}", getattr(mla, key))
    require(mla.qk_rope_head_dim % 2 == 0,
            f"{p}.qk_rope_head_dim={mla.qk_rope_head_dim} is odd; rotary embeddings turn pairs, make it even")
    require(lm.num_kv_heads == lm.num_heads,
            f"model.language.num_kv_heads={lm.num_kv_heads} differs from num_heads={lm.num_heads}: latent attention "
            f"({p}.kv_lora_rank > 0) gives every head its own key and value; set num_kv_heads={lm.num_heads}")
    require(not (lm.qkv_bias or lm.qk_norm),
            f"latent attention ({p}.kv_lora_rank > 0) has no q/k/v biases or per-head q/k norms; use kind=llama")
    require(lm.head_dim == 0, f"model.language.head_dim={lm.head_dim} has no use under latent attention (its widths "
                              f"are {p}.qk_nope_head_dim, qk_rope_head_dim and v_head_dim); leave it 0")


def _check_rope(cfg: ModelConfig) -> None:
    lm = cfg.language
    require(lm.rope_scaling in ROPE_SCALINGS,
            f"model.language.rope_scaling={lm.rope_scaling!r} is unknown; choose one of {list(ROPE_SCALINGS)}")
    if lm.rope_scaling == "llama3":
        positive("model.language.rope_factor", lm.rope_factor)
        positive("model.language.rope_original_max_positions", lm.rope_original_max_positions)
        require(0 < lm.rope_low_freq_factor < lm.rope_high_freq_factor,
                f"model.language.rope_low_freq_factor={lm.rope_low_freq_factor} and rope_high_freq_factor="
                f"{lm.rope_high_freq_factor} must satisfy 0 < low < high (Llama 3.1: 1 and 4)")


def _check_kind_flags(cfg: ModelConfig) -> None:
    """Each kind is one architecture: its flags are fixed (a Hugging Face checkpoint of it has those tensors)."""
    lm = cfg.language
    hf = ADAPTERS[lm.kind]
    for flag, want in (("qkv_bias", hf.qkv_bias), ("qk_norm", hf.qk_norm)):
        require(getattr(lm, flag) == want,
                f"model.language.kind={lm.kind} needs model.language.{flag}={str(want).lower()}; set it, or choose "
                "the kind whose layers you want (llama: neither flag, qwen2: qkv_bias, qwen3: qk_norm)")


def validate(cfg: ModelConfig) -> None:
    _check_shapes(cfg)
    _check_rope(cfg)
    _check_kind_flags(cfg)
    validate_moe(cfg.language)


def tp_divisible(cfg: ModelConfig) -> dict[str, int]:
    lm = cfg.language
    return {"model.language.num_heads": lm.num_heads, "model.language.num_kv_heads": lm.num_kv_heads,
            "model.language.intermediate_size": lm.intermediate_size, "model.language.vocab_size": lm.vocab_size}


def tp_comm_bytes(cfg: ModelConfig, batch: int, seq_len: int, images: int, act_bytes: int) -> dict[str, int]:
    """With a = [B, T, D], per layer: forward all-gather a into attention and into the MLP, reduce-scatter a
    out of each; backward all-gather a for each row-parallel output, reduce-scatter a out of attention and the
    MLP. The first layer's input (Replicate -> Shard(1), a slice) all-gathers a in backward; the
    vocabulary-parallel embedding all-reduces a forward; the final norm gathers a forward and reduce-scatters
    it backward; loss_parallel all-reduces 3 x B*T fp32 (max logit, sum of exps, target logit)."""
    lm = cfg.language
    a = batch * seq_len * lm.hidden_size * act_bytes
    return {"all_gather": (4 * lm.num_layers + 2) * a, "reduce_scatter": (4 * lm.num_layers + 1) * a,
            "all_reduce": a + 3 * batch * seq_len * 4}


SPEC = register_part("language", LanguagePartSpec(
    kind="llama", build=lambda cfg: LanguageModel(cfg.language), num_params=counts.num_params,
    apply_tensor_parallel=parallelize.apply_tensor_parallel, tp_divisible=tp_divisible, validate=validate,
    block_container="layers", hf=ADAPTERS["llama"], flops_per_token=counts.flops_per_token,
    layer_flops=counts.layer_flops, head_flops=counts.head_flops, keep_stage=parallelize.keep_stage,
    tied_embedding=parallelize.tied_embedding, num_layers=lambda cfg: cfg.language.num_layers,
    tp_comm_bytes=tp_comm_bytes, layer_activation_bytes=counts.layer_activation_bytes))
QWEN2 = register_part("language", dataclasses.replace(SPEC, kind="qwen2", hf=ADAPTERS["qwen2"]))
QWEN3 = register_part("language", dataclasses.replace(SPEC, kind="qwen3", hf=ADAPTERS["qwen3"]))

__all__ = ["KVCache", "LanguageModel", "QWEN2", "QWEN3", "SPEC"]
