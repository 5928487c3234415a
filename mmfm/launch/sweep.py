"""Sweep expansion for `mmfm launch --multirun`, with Hydra's override grammar and BasicSweeper semantics:
`key=a,b`, `key=range(...)`, `key=choice(...)`, `group=glob(...)`; the jobs are the cartesian product."""

from __future__ import annotations

import itertools

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from mmfm.config import ConfigError, config_dir
from mmfm.config.load import register_schema


def _parse(overrides: list[str]) -> list[tuple[str, list[str] | None]]:
    """Each override as given, with its swept values (see _values)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
            # inside the context: glob() over a config group lists the group's options
            return [_values(o) for o in parser.parse_overrides(overrides)]
    except HydraException as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from None


def _values(override) -> tuple[str, list[str] | None]:
    """(the override as given, its swept `key=value` strings, or None when it sets a single value)."""
    if not override.is_sweep_override():
        return override.input_line, None
    if not override.is_discrete_sweep():
        raise ConfigError(f"{override.input_line}: only discrete sweeps (a,b / range / choice / glob) can be launched")
    return override.input_line, [f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()]


def expand_sweep(overrides: list[str]) -> tuple[list[str], list[list[str]]]:
    """(the overrides every job shares, each job's swept overrides in product order)."""
    parsed = _parse(overrides)
    fixed = [line for line, values in parsed if values is None]
    swept = [values for _, values in parsed if values is not None]
    if not swept:
        raise ConfigError(f"--multirun given but no override sweeps a value ({' '.join(overrides)}); "
                          "sweep with key=a,b or drop --multirun")
    return fixed, [list(combination) for combination in itertools.product(*swept)]
