"""Find the Hydra config tree, register the schema, compose configs and turn them into JobConfig."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmfm.config.schema import JobConfig
from mmfm.errors import ConfigError

SCHEMA_NAME = "mmfm_schema"
PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # package data (pyproject.toml)


def register_schema() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=JobConfig)


def config_dir() -> Path:
    """The Hydra config tree: $MMFM_CONFIG_DIR when set, else `mmfm/configs/` inside the installed package."""
    env = os.environ.get("MMFM_CONFIG_DIR")
    path = Path(env) if env else PACKAGE_CONFIGS
    if not (path / "config.yaml").is_file():
        fix = ("point MMFM_CONFIG_DIR at a folder with config.yaml (a copy of mmfm/configs/) or unset it" if env
               else "the mmfm installation is incomplete; reinstall mmfm")
        raise ConfigError(f"no config.yaml in {path}: {fix}")
    return path


def to_job_config(cfg: DictConfig) -> JobConfig:
    """Resolve a composed config into the typed JobConfig, as one-line ConfigErrors on type mistakes."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        first_line = str(exc).strip().splitlines()[0]
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{key}: {first_line}" if key else first_line) from None


def load_config(overrides: Sequence[str] = ()) -> JobConfig:
    """Compose `config.yaml` of config_dir() with Hydra overrides (as on the command line), without running a job."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register_schema()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except HydraException as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from None
    return to_job_config(cfg)


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
    """The resolved config a run saved as `config.yaml` in its run directory (with key=value overrides on it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no run config at {path}; point at a run directory written by `mmfm train`")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {str(exc).strip().splitlines()[0]}") from None
    return to_job_config(merged)
