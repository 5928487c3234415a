"""Plain PyTorch model code: no parallelism inside, applied from outside by mmfm.parallel."""

from mmfm.models.registry import MODEL_REGISTRY, ModelSpec, build_model
from mmfm.models.vlm import VisionLanguageModel

__all__ = ["MODEL_REGISTRY", "ModelSpec", "VisionLanguageModel", "build_model"]
