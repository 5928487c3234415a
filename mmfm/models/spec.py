"""Model families behind one spec. A family (models/<family>/) registers a PartSpec: its module, its tensor-
parallel plan, its counts and its layout checks; a language family also its pipeline split. A model
(`model.name`, e.g. the VLM) composes parts chosen in config by kind and registers a ModelSpec, whose hooks
mmfm.parallel and the trainer call: they never name a family's attributes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from mmfm.config.schema import ModelConfig
from mmfm.errors import ConfigError

class UnsupportedConfig(ValueError):
    """A Hugging Face config.json a kind cannot express; the message names the key (mmfm.checkpoint.hf adds the
    file)."""


@dataclass(frozen=True)
class Stacked:
    """An adapter's checkpoint name for a parameter [E, a, b] that the checkpoint holds as E tensors [b, a], one
    per expert (transposed: nn.Linear's [out, in]), in `names` order."""
    names: tuple[str, ...]


# A part's hooks take the whole ModelConfig: a projector needs both widths, a tower the image size.
Build = Callable[[ModelConfig], nn.Module]
Count = Callable[[ModelConfig], int]


@dataclass(frozen=True)
class PartSpec:
    """kind: the config value (model.vision.kind, model.projector.kind, model.language.kind) that picks it.

    apply_tensor_parallel(module, tp_mesh): shard the part in place (a pipeline stage may hold a subset).
    tp_divisible(cfg): {what: size} for every size that tensor parallelism splits (tp must divide each).
    validate(cfg): raise ConfigError, naming the field and the fix, on a shape the part cannot build.
    block_container: the child of the part holding its repeated blocks (FSDP, checkpointing, compile units).
    hf: the kind's Hugging Face adapter (parameter names and config.json mapping, as
        mmfm.models.llama.state_dict_adapter), or None when it has none (mmfm.checkpoint.hf uses it).
    tp_comm_bytes(cfg, batch, seq_len, images, act_bytes): {collective: bytes} its tensor-parallel plan moves per
        rank for one micro-batch, forward and backward (mmfm.parallel.comm), or None where not modelled.
    """

    kind: str
    build: Build
    num_params: Count
    apply_tensor_parallel: Callable[[nn.Module, object], None]
    tp_divisible: Callable[[ModelConfig], dict[str, int]]
    validate: Callable[[ModelConfig], None]
    block_container: Optional[str] = None
    hf: Optional[object] = None
    tp_comm_bytes: Optional[Callable[[ModelConfig, int, int, int, int], dict[str, int]]] = None


@dataclass(frozen=True)
class LanguagePartSpec(PartSpec):
    """A decoder, which the pipeline splits by layers.

    flops_per_token(cfg, seq_len): training FLOPs per position; layer_flops(cfg, seq_len): one layer's per
    sample; head_flops(cfg, seq_len): the output projection's per sample.
    keep_stage(module, layers, first, last): drop what a pipeline stage does not compute, in place.
    tied_embedding(module): the input embedding's weight when it is also the output projection and held here.
    num_layers(cfg): how many layers the pipeline splits.
    layer_activation_bytes(cfg, tokens, tp, cp, kernels, residual, fused_norm, backward=False): bytes one layer
        keeps for backward over a micro-batch of `tokens` positions, with the residual stream's element size
        (mmfm.plan.memory.residual_bytes) and whether the fused RMSNorm runs (memory.fused_norm); backward=True adds
        what its backward holds besides at its peak (mmfm.plan: its activation formula, docs/planning.md).
    """

    flops_per_token: Callable[[ModelConfig, int], float] = None
    layer_flops: Callable[[ModelConfig, int], float] = None
    head_flops: Callable[[ModelConfig, int], float] = None
    keep_stage: Callable[[nn.Module, list, bool, bool], None] = None
    tied_embedding: Callable[[nn.Module], Optional[torch.Tensor]] = None
    num_layers: Count = None
    layer_activation_bytes: Callable[..., float] = None


@dataclass(frozen=True)
class EncoderPartSpec(PartSpec):
    """A vision tower or projector: flops_per_image(cfg), training FLOPs for one image."""

    flops_per_image: Callable[[ModelConfig], float] = None


VISION: dict[str, EncoderPartSpec] = {}
PROJECTORS: dict[str, EncoderPartSpec] = {}
LANGUAGE: dict[str, LanguagePartSpec] = {}
PART_REGISTRIES = {"vision": VISION, "projector": PROJECTORS, "language": LANGUAGE}


def register_part(role: str, spec: PartSpec) -> PartSpec:
    PART_REGISTRIES[role][spec.kind] = spec
    return spec


def part_spec(cfg: ModelConfig, role: str) -> PartSpec:
    kind = getattr(cfg, role).kind
    registry = PART_REGISTRIES[role]
    if kind not in registry:
        raise ConfigError(f"model.{role}.kind={kind!r} is unknown; choose one of {sorted(registry)}")
    return registry[kind]


class ModelSpec:
    """A whole model (`model.name`): the hooks that mmfm.parallel, the planner and the trainer call.

    roles: the parts it composes (model.<role>.kind picks each), e.g. ("language", "vision", "projector")."""

    name: str
    roles: tuple[str, ...]

    def build(self, cfg: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def validate(self, cfg: ModelConfig) -> None:
        """Raise ConfigError on a model config that cannot build."""
        raise NotImplementedError

    def validate_training(self, cfg: ModelConfig) -> None:
        """Raise ConfigError when mmfm train cannot train this model (checked before anything is written)."""

    def num_params(self, cfg: ModelConfig) -> int:
        raise NotImplementedError

    def training_flops(self, cfg: ModelConfig, num_positions: int, seq_len: int, num_images: int) -> float:
        """FLOPs of one optimizer step over num_positions sequence positions and num_images images."""
        raise NotImplementedError

    def block_containers(self, cfg: ModelConfig) -> tuple[str, ...]:
        """Containers whose children are the repeated blocks: the FSDP, checkpointing and compile units."""
        raise NotImplementedError

    def tp_divisible(self, cfg: ModelConfig) -> dict[str, int]:
        raise NotImplementedError

    def apply_tensor_parallel(self, model: nn.Module, tp_mesh) -> None:
        raise NotImplementedError

    def pipeline_layers(self, cfg: ModelConfig) -> int:
        """How many layers the pipeline splits."""
        raise NotImplementedError

    def stage_costs(self, cfg: ModelConfig, seq_len: int) -> tuple[list[float], float, float]:
        """Training FLOPs per sample: (each layer, first-stage extras, last-stage extras)."""
        raise NotImplementedError

    def split_stage(self, model: nn.Module, first: bool, last: bool, layers: list[int]) -> None:
        """Drop, in place, what a pipeline stage holding `layers` does not compute."""
        raise NotImplementedError

    def tied_embedding(self, part: nn.Module) -> Optional[torch.Tensor]:
        """The input embedding weight this part holds when it is also the output projection."""
        raise NotImplementedError

    def decoder_layers(self, part: nn.Module) -> nn.Module:
        """The container of the causal decoder layers (context parallelism splits their sequence)."""
        raise NotImplementedError


class LanguagePartModelSpec(ModelSpec):
    """A model whose causal decoder is its `language` part (of the kind model.language.kind names)."""

    def tied_embedding(self, part: nn.Module) -> Optional[torch.Tensor]:
        return part_spec(part.cfg, "language").tied_embedding(part.language)

    def decoder_layers(self, part: nn.Module) -> nn.Module:
        return part.language.get_submodule(part_spec(part.cfg, "language").block_container)


MODEL_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    MODEL_REGISTRY[spec.name] = spec
    return spec


def model_spec(cfg: ModelConfig) -> ModelSpec:
    if cfg.name not in MODEL_REGISTRY:
        raise ConfigError(f"model.name={cfg.name!r} is unknown; choose one of {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[cfg.name]
