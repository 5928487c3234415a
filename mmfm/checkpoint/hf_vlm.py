"""Hugging Face checkpoints of the VLM: a whole LlavaForConditionalGeneration folder, or its parts from their
own folders (a CLIP / SigLIP vision model, a *ForCausalLM), read into the model at any layout (each rank its
own slice, a pipeline stage only what it holds: mmfm.checkpoint.hf.load_parameters), and the VLM written back
as a LLaVA folder. Names and config mapping: mmfm.models.vlm.state_dict_adapter.

`model.pretrained` (vlm, or vision and/or language) names the folders; `load_pretrained` fills the model after
its seeded initialization (the projector keeps that when only parts are given), and `check_pretrained` is the
preflight's check of the folders' config.json against model.*.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from mmfm.checkpoint.hf import (CONFIG, DEFAULT_SHARD_BYTES, HFCheckpointError, _gathered, language_config_from_hf,
                                language_mismatches, load_language, load_parameters, read_hf_config, tensor_files,
                                whole_params, write_hf_folder)
from mmfm.config.schema import LanguageConfig, ModelConfig, VisionConfig
from mmfm.models.clip.state_dict_adapter import ADAPTERS as VISION_ADAPTERS
from mmfm.models.clip.state_dict_adapter import UnexpectedTensors, adapter_for, find_prefix
from mmfm.models.spec import UnsupportedConfig
from mmfm.models.vlm import state_dict_adapter as llava

# model.vision fields a checkpoint's tower must agree on (feature_layer included: later layers are not built)
VISION_FIELDS = ("kind", "image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "norm_eps", "act", "feature_layer")


def _vision_value(v: VisionConfig, name: str):
    from mmfm.models.clip.model import activation
    from mmfm.models.vit.model import mlp_width

    return {"intermediate_size": mlp_width, "act": activation}.get(name, lambda v: getattr(v, name))(v)


def _differences(ours: ModelConfig, theirs: ModelConfig, roles: tuple[str, ...]) -> list[str]:
    out = []
    if "vision" in roles:
        out += [f"model.vision.{f}={_vision_value(ours.vision, f)!r} (checkpoint: {_vision_value(theirs.vision, f)!r})"
                for f in VISION_FIELDS if _vision_value(ours.vision, f) != _vision_value(theirs.vision, f)]
    if "language" in roles:
        out += [f"model.language.{f}={a!r} (checkpoint: {b!r})"
                for f, a, b in language_mismatches(ours.language, theirs.language)]
    if "vlm" in roles and ours.image_token_id != theirs.image_token_id:
        out.append(f"model.image_token_id={ours.image_token_id} (checkpoint: {theirs.image_token_id})")
    return out


def _refuse_differences(folder, diffs: list[str]) -> None:
    if diffs:
        raise HFCheckpointError(f"model.* does not match {Path(folder) / CONFIG}: {'; '.join(diffs[:4])}"
                                f"{' (+%d more)' % (len(diffs) - 4) if len(diffs) > 4 else ''}; set those fields as "
                                "the checkpoint has them")


# ---------------------------------------------------------------- config.json -> model config


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face folder (config.json), not an mmfm run directory (config.yaml)."""
    return (path / CONFIG).is_file() and not (path / "config.yaml").is_file()


def model_config_from_hf(folder: str | Path, **overrides) -> ModelConfig:
    """The ModelConfig of a LLaVA folder (its config.json); overrides: ModelConfig fields (e.g. init_std)."""
    where = Path(folder) / CONFIG
    try:
        found = llava.config_from_hf(read_hf_config(folder))
    except UnsupportedConfig as exc:
        raise HFCheckpointError(f"{where}: {exc}; mmfm cannot read this checkpoint as a VLM") from None
    return ModelConfig(vision=VisionConfig(**found["vision"]), language=LanguageConfig(**found["language"]),
                       image_token_id=found["image_token_id"], **overrides)


def vision_config_from_hf(folder: str | Path, feature_layer: int) -> VisionConfig:
    """model.vision of a CLIP / SigLIP folder (a vision model or a two-tower model), at our feature layer."""
    hf = read_hf_config(folder)
    try:
        return VisionConfig(**adapter_for(hf).config_from_hf(hf, feature_layer))
    except UnsupportedConfig as exc:
        raise HFCheckpointError(f"{Path(folder) / CONFIG}: {exc}; use a CLIP or SigLIP vision checkpoint") from None


def check_pretrained(cfg: ModelConfig) -> None:
    """Preflight: each model.pretrained folder is a Hugging Face folder whose config matches model.*."""
    p = cfg.pretrained
    if p.vlm and (p.vision or p.language):
        raise HFCheckpointError("model.pretrained.vlm is set with model.pretrained.vision/language: give the whole "
                                "VLM's folder or the parts' folders, not both")
    if p.vlm:
        _refuse_differences(p.vlm, _differences(cfg, model_config_from_hf(p.vlm), ("vision", "language", "vlm")))
    if p.vision:
        theirs = vision_config_from_hf(p.vision, cfg.vision.feature_layer)
        _refuse_differences(p.vision, _differences(cfg, ModelConfig(vision=theirs), ("vision",)))
    if p.language:
        theirs = language_config_from_hf(p.language)
        _refuse_differences(p.language, _differences(cfg, ModelConfig(language=theirs), ("language",)))


# ---------------------------------------------------------------- into the model


def load_vlm(model: nn.Module, folder: str | Path) -> None:
    """Fill a VisionLanguageModel (or this rank's pipeline stage / shards of one) from a LLaVA folder."""
    cfg = model.cfg
    _refuse_differences(folder, _differences(cfg, model_config_from_hf(folder), ("vision", "language", "vlm")))
    try:
        layout = llava.find_layout(tensor_files(folder))
    except UnsupportedConfig as exc:
        raise HFCheckpointError(f"{folder}: {exc}") from None
    load_parameters(model, folder, llava.names(cfg, layout), copies=llava.tied_copies(cfg, layout),
                    ignored=llava.ignored(cfg, layout))


def load_vision(tower: nn.Module, cfg: ModelConfig, folder: str | Path) -> None:
    """Fill the tower from a CLIP / SigLIP folder (alone or in a two-tower model: the text tower is not read)."""
    theirs = vision_config_from_hf(folder, cfg.vision.feature_layer)
    _refuse_differences(folder, _differences(cfg, ModelConfig(vision=theirs), ("vision",)))
    adapter = VISION_ADAPTERS[cfg.vision.kind]
    held = tensor_files(folder)
    try:
        prefix = find_prefix(held)
    except UnexpectedTensors as exc:
        raise HFCheckpointError(f"{folder}: {exc}") from None
    tower_tensors = set(adapter.tower_names(held, prefix))
    skipped = adapter.skipped(cfg.vision, prefix)
    load_parameters(tower, folder, adapter.names(cfg.vision, prefix),
                    ignored=lambda n: n not in tower_tensors or bool(skipped.match(n)))


def load_pretrained(model: nn.Module, cfg: ModelConfig) -> bool:
    """Fill the parts model.pretrained names (this rank's slices); False when it names none."""
    p = cfg.pretrained
    if p.vlm:
        load_vlm(model, p.vlm)
    if p.vision and model.vision is not None:  # a later pipeline stage holds no tower
        load_vision(model.vision, cfg, p.vision)
    if p.language:
        load_language(model.language, p.language)
    return bool(p.vlm or p.vision or p.language)


# ---------------------------------------------------------------- a LLaVA folder from the model


def export_vlm(model: nn.Module, out_dir: str | Path, dtype: Optional[torch.dtype] = None,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES, extras: Optional[Callable[[Path], None]] = None) -> Path:
    """Write a whole VisionLanguageModel as the folder LlavaForConditionalGeneration loads (config.json + shards;
    extras(folder) adds the tokenizer and processor files). Every rank calls it under TP / FSDP; a pipeline
    stage cannot export."""
    cfg = model.cfg
    if cfg.vision.kind not in VISION_ADAPTERS:
        raise HFCheckpointError(f"model.vision.kind={cfg.vision.kind} has no Hugging Face form (LLaVA's tower is "
                                f"CLIP or SigLIP; tiny_vlm's vit has no transformers class): export the language "
                                "model alone (--language-only) or train with a clip / siglip tower (model=tiny_llava)")
    names = llava.names(cfg)
    params = whole_params(model, names, "export_vlm needs the whole VLM")
    written = dtype or next(iter(params.values())).dtype
    config = llava.config_to_hf(cfg, str(written).removeprefix("torch."))
    tensors = _gathered(((theirs, params[ours]) for ours, theirs in names.items()), dtype)
    return write_hf_folder(out_dir, tensors, config, max_shard_bytes, extras)


__all__ = ["check_pretrained", "export_vlm", "load_pretrained", "load_vision", "load_vlm", "model_config_from_hf",
           "vision_config_from_hf"]
