"""Typed config schema, Hydra registration and validation."""

from mmfm.config.load import config_dir, load_config, to_job_config
from mmfm.config.schema import JobConfig
from mmfm.config.validate import Preflight, image_tokens, preflight, validate
from mmfm.errors import ConfigError

__all__ = ["ConfigError", "JobConfig", "Preflight", "preflight", "config_dir", "image_tokens", "load_config", "to_job_config", "validate"]
