"""The gpt family (model.language.kind=gpt): the decoder of the published Megatron-LM GPT runs (LayerNorm with bias,
biased linear layers, learned absolute positions, a 4 x hidden GELU MLP, the embedding shared with the output
layer), sized by the model.language fields. For planning and meta-device builds (model=gpt, docs/models.md)."""

from __future__ import annotations

from mmfm.config.checks import positive, require
from mmfm.config.schema import ModelConfig
from mmfm.models.gpt import counts, parallelize
from mmfm.models.gpt.model import GPTLanguageModel, ffn_width
from mmfm.models.llama import tp_comm_bytes  # the same Megatron-style plan moves the same activations
from mmfm.models.llama.parallelize import tied_embedding
from mmfm.models.spec import LanguagePartSpec, register_part


def _check_sizes(cfg: ModelConfig) -> None:
    lm = cfg.language
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
        positive(f"model.language.{key}", getattr(lm, key))
    require(lm.intermediate_size >= 0,
            f"model.language.intermediate_size={lm.intermediate_size} must be >= 0 (0: 4 x hidden_size)")


def _check_heads(cfg: ModelConfig) -> None:
    lm = cfg.language
    require(lm.hidden_size % lm.num_heads == 0,
            f"model.language.hidden_size={lm.hidden_size} is not divisible by model.language.num_heads="
            f"{lm.num_heads}; change one so that hidden_size % num_heads == 0")
    require(lm.num_kv_heads == lm.num_heads,
            f"model.language.num_kv_heads={lm.num_kv_heads} differs from model.language.num_heads={lm.num_heads}; "
            "kind=gpt has no grouped-query attention: set num_kv_heads=${model.language.num_heads} (model=gpt does)")
    require(lm.head_dim in (0, lm.hidden_size // lm.num_heads),
            f"model.language.head_dim={lm.head_dim} is not hidden_size / num_heads; kind=gpt takes "
            "model.language.head_dim=0")


def _check_unused_options(cfg: ModelConfig) -> None:
    """The llama family's options have no place in a GPT layer: refused rather than ignored."""
    lm = cfg.language
    require(not lm.qk_norm and lm.rope_scaling == "none",
            f"model.language.qk_norm={lm.qk_norm} / rope_scaling={lm.rope_scaling} apply to the llama family; "
            "kind=gpt has learned positions and no q/k norm: set qk_norm=false rope_scaling=none")
    require(lm.moe.num_experts == 0,
            f"model.language.moe.num_experts={lm.moe.num_experts}: kind=gpt has dense MLPs only; use a llama-family "
            "kind (llama, qwen2, qwen3) for a mixture of experts, or set model.language.moe.num_experts=0")
    require(lm.mla.kv_lora_rank == 0,
            f"model.language.mla.kv_lora_rank={lm.mla.kv_lora_rank}: kind=gpt has multi-head attention only; use "
            "kind=llama for latent attention, or set model.language.mla.kv_lora_rank=0")


def validate(cfg: ModelConfig) -> None:
    _check_sizes(cfg)
    _check_heads(cfg)
    _check_unused_options(cfg)


def tp_divisible(cfg: ModelConfig) -> dict[str, int]:
    lm = cfg.language
    width = "model.language.intermediate_size" if lm.intermediate_size else "4 x model.language.hidden_size"
    return {"model.language.num_heads": lm.num_heads, width: ffn_width(lm), "model.language.vocab_size": lm.vocab_size}


SPEC = register_part("language", LanguagePartSpec(
    kind="gpt", build=lambda cfg: GPTLanguageModel(cfg.language), num_params=counts.num_params,
    apply_tensor_parallel=parallelize.apply_tensor_parallel, tp_divisible=tp_divisible, validate=validate,
    block_container="layers", flops_per_token=counts.flops_per_token, layer_flops=counts.layer_flops,
    head_flops=counts.head_flops, keep_stage=parallelize.keep_stage, tied_embedding=tied_embedding,
    num_layers=lambda cfg: cfg.language.num_layers, tp_comm_bytes=tp_comm_bytes,
    layer_activation_bytes=counts.layer_activation_bytes))

__all__ = ["GPTLanguageModel", "SPEC"]
