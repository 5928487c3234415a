"""Plain PyTorch model code: no parallelism inside, applied from outside by mmfm.parallel.

Families (llama, gpt, vit, clip, projector) register their parts; models (vlm, lm) compose them (mmfm.models.spec).
"""

from mmfm.models import clip, gpt, llama, lm, projector, vit  # noqa: F401  (register the families and models)
from mmfm.models.registry import build_model
from mmfm.models.spec import MODEL_REGISTRY, ModelSpec, model_spec
from mmfm.models.vlm import VisionLanguageModel

__all__ = ["MODEL_REGISTRY", "ModelSpec", "VisionLanguageModel", "build_model", "model_spec"]
