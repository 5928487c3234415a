"""The two checks config validation is made of; each failure is a ConfigError of one line."""

from __future__ import annotations

from mmfm.errors import ConfigError


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def positive(name: str, value: float) -> None:
    require(value > 0, f"{name}={value} must be > 0")
