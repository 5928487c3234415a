"""The language-only model's spec (model.name=lm): one part, the language model of model.language.kind (gpt, llama,
qwen2, qwen3); each hook delegates to it. For planning (mmfm plan) and meta-device builds: mmfm train runs the
vision-language model only and refuses this one before writing anything."""

from __future__ import annotations

from torch import nn

from mmfm.config.schema import ModelConfig
from mmfm.errors import ConfigError
from mmfm.models.lm.model import CausalLanguageModel
from mmfm.models.spec import LanguagePartModelSpec, part_spec, register_model


class LanguageModelSpec(LanguagePartModelSpec):
    name = "lm"
    roles = ("language",)

    def build(self, cfg: ModelConfig) -> nn.Module:
        return CausalLanguageModel(cfg)

    def validate(self, cfg: ModelConfig) -> None:
        part_spec(cfg, "language").validate(cfg)

    def validate_training(self, cfg: ModelConfig) -> None:
        raise ConfigError(f"model.name=lm (model.language.kind={cfg.language.kind}) is for planning and meta-device "
                "builds (mmfm plan, build_model(cfg.model, 'meta')): mmfm train trains vision-language models only; "
                "choose a model.name=vlm preset such as model=tiny_vlm")

    def num_params(self, cfg: ModelConfig) -> int:
        return part_spec(cfg, "language").num_params(cfg)

    def training_flops(self, cfg: ModelConfig, num_positions: int, seq_len: int, num_images: int) -> float:
        return num_positions * part_spec(cfg, "language").flops_per_token(cfg, seq_len)

    def block_containers(self, cfg: ModelConfig) -> tuple[str, ...]:
        return (f"language.{part_spec(cfg, 'language').block_container}",)

    def tp_divisible(self, cfg: ModelConfig) -> dict[str, int]:
        return part_spec(cfg, "language").tp_divisible(cfg)

    def apply_tensor_parallel(self, model: nn.Module, tp_mesh) -> None:
        part_spec(model.cfg, "language").apply_tensor_parallel(model.language, tp_mesh)

    def pipeline_layers(self, cfg: ModelConfig) -> int:
        return part_spec(cfg, "language").num_layers(cfg)

    def stage_costs(self, cfg: ModelConfig, seq_len: int) -> tuple[list[float], float, float]:
        """The embedding lookups cost no matmul FLOPs: no first-stage extra."""
        lm = part_spec(cfg, "language")
        return [lm.layer_flops(cfg, seq_len)] * lm.num_layers(cfg), 0.0, lm.head_flops(cfg, seq_len)

    def split_stage(self, model: nn.Module, first: bool, last: bool, layers: list[int]) -> None:
        model.first_stage = first
        part_spec(model.cfg, "language").keep_stage(model.language, layers, first, last)


SPEC = register_model(LanguageModelSpec())

__all__ = ["CausalLanguageModel", "SPEC"]
