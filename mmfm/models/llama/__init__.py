"""The llama family: Llama-style decoders (RMSNorm, rotary, grouped-query attention, SwiGLU)."""

from __future__ import annotations

from mmfm.config.checks import positive, require
from mmfm.config.schema import ModelConfig
from mmfm.models.llama import counts, parallelize
from mmfm.models.llama.model import KVCache, LanguageModel
from mmfm.models.spec import LanguagePartSpec, register_part


def validate(cfg: ModelConfig) -> None:
    lm = cfg.language
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        positive(f"model.language.{key}", getattr(lm, key))
    require(lm.hidden_size % lm.num_heads == 0,
            f"model.language.hidden_size={lm.hidden_size} is not divisible by "
            f"model.language.num_heads={lm.num_heads}; change one so that hidden_size % num_heads == 0")
    require(lm.num_heads % lm.num_kv_heads == 0,
            f"model.language.num_kv_heads={lm.num_kv_heads} does not divide model.language.num_heads="
            f"{lm.num_heads}; grouped-query attention needs num_heads % num_kv_heads == 0")
    require((lm.hidden_size // lm.num_heads) % 2 == 0,
            f"model.language head size {lm.hidden_size // lm.num_heads} is odd; rotary embeddings need an "
            "even head size (hidden_size / num_heads)")


def tp_divisible(cfg: ModelConfig) -> dict[str, int]:
    lm = cfg.language
    return {"model.language.num_heads": lm.num_heads, "model.language.num_kv_heads": lm.num_kv_heads,
            "model.language.intermediate_size": lm.intermediate_size, "model.language.vocab_size": lm.vocab_size}


SPEC = register_part("language", LanguagePartSpec(
    kind="llama", build=lambda cfg: LanguageModel(cfg.language), num_params=counts.num_params,
    apply_tensor_parallel=parallelize.apply_tensor_parallel, tp_divisible=tp_divisible, validate=validate,
    block_container="layers", flops_per_token=counts.flops_per_token, layer_flops=counts.layer_flops,
    head_flops=counts.head_flops, keep_stage=parallelize.keep_stage, tied_embedding=parallelize.tied_embedding,
    num_layers=lambda cfg: cfg.language.num_layers))

__all__ = ["KVCache", "LanguageModel", "SPEC"]
