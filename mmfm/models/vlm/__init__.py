"""The vision-language model's spec: each hook delegates to the spec of the part that owns it."""

from __future__ import annotations

from torch import nn

from mmfm.config.checks import require
from mmfm.config.schema import ModelConfig
from mmfm.models.spec import LanguagePartModelSpec, part_spec, register_model
from mmfm.models.vlm.model import VisionLanguageModel

ROLES = ("language", "vision", "projector")  # language first: its checks name the most common mistakes


class VisionLanguageSpec(LanguagePartModelSpec):
    name = "vlm"
    roles = ROLES

    def build(self, cfg: ModelConfig) -> nn.Module:
        return VisionLanguageModel(cfg)

    def validate(self, cfg: ModelConfig) -> None:
        for role in ROLES:
            part_spec(cfg, role).validate(cfg)
        require(cfg.language.vocab_size > cfg.image_token_id >= 0,
                f"model.image_token_id={cfg.image_token_id} must lie inside model.language.vocab_size="
                f"{cfg.language.vocab_size}")

    def num_params(self, cfg: ModelConfig) -> int:
        return sum(part_spec(cfg, role).num_params(cfg) for role in ROLES)

    def flops_per_image(self, cfg: ModelConfig) -> float:
        return part_spec(cfg, "vision").flops_per_image(cfg) + part_spec(cfg, "projector").flops_per_image(cfg)

    def training_flops(self, cfg: ModelConfig, num_positions: int, seq_len: int, num_images: int) -> float:
        per_token = part_spec(cfg, "language").flops_per_token(cfg, seq_len)
        return num_positions * per_token + num_images * self.flops_per_image(cfg)

    def block_containers(self, cfg: ModelConfig) -> tuple[str, ...]:
        return tuple(f"{role}.{part_spec(cfg, role).block_container}" for role in ("vision", "language"))

    def tp_divisible(self, cfg: ModelConfig) -> dict[str, int]:
        sizes = {}
        for role in ROLES:
            sizes.update(part_spec(cfg, role).tp_divisible(cfg))
        return sizes

    def apply_tensor_parallel(self, model: nn.Module, tp_mesh) -> None:
        for role in ("vision", "projector", "language"):
            part = getattr(model, role)
            if part is not None:  # a later pipeline stage holds no vision tower or projector
                part_spec(model.cfg, role).apply_tensor_parallel(part, tp_mesh)

    def pipeline_layers(self, cfg: ModelConfig) -> int:
        return part_spec(cfg, "language").num_layers(cfg)

    def stage_costs(self, cfg: ModelConfig, seq_len: int) -> tuple[list[float], float, float]:
        lm = part_spec(cfg, "language")
        layers = [lm.layer_flops(cfg, seq_len)] * lm.num_layers(cfg)
        return layers, self.flops_per_image(cfg), lm.head_flops(cfg, seq_len)

    def split_stage(self, model: nn.Module, first: bool, last: bool, layers: list[int]) -> None:
        """The tower and projector live on the first stage, the decoder's layers where they are assigned."""
        if not first:
            model.vision, model.projector = None, None
        part_spec(model.cfg, "language").keep_stage(model.language, layers, first, last)


SPEC = register_model(VisionLanguageSpec())

__all__ = ["SPEC", "VisionLanguageModel"]
