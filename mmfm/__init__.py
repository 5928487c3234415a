"""mmfm: a training framework for multimodal foundation models."""

__version__ = "0.1.0"
