"""Strict reading of config.json: the file itself, and each value checked for its type and range.

A config value is never coerced: an integer field takes a JSON integer (not true, not 4096.0, not "4096"),
a flag takes true or false (not "false", which Python would read as True), a number is finite. Anything else
is a ConfigError that names the field, so a hand-edited or hostile config.json cannot silently change the model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MAX_CONFIG_BYTES = 1 << 20  # real config.json files are a few kB


class ConfigError(ValueError):
    """A config.json that is missing a field or asks for something this implementation does not do."""


def show(value: Any) -> str:
    """A short repr for error messages (a hostile value may be huge or deeply nested)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def integer(name: str, value: Any, lo: int = 1, hi: int | None = None) -> int:
    """value as a JSON integer in [lo, hi]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"config field '{name}' must be an integer, got {show(value)}")
    if value < lo or (hi is not None and value > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"config field '{name}' must be an integer {bound}, got {show(value)}")
    return value


def number(name: str, value: Any, *, above: float | None = None, at_least: float | None = None,
           below: float | None = None) -> float:
    """value as a finite float; above / at_least / below are the bounds it must respect (strict, >=, strict)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"config field '{name}' must be a number, got {show(value)}")
    try:
        x = float(value)
    except OverflowError:  # an integer with hundreds of digits
        x = math.inf
    if not math.isfinite(x):
        raise ConfigError(f"config field '{name}' must be a finite number, got {show(value)}")
    for ok, bound in ((above is None or x > above, f"> {above}"), (at_least is None or x >= at_least, f">= {at_least}"),
                      (below is None or x < below, f"< {below}")):
        if not ok:
            raise ConfigError(f"config field '{name}' must be a number {bound}, got {show(value)}")
    return x


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config field '{name}' must be true or false, got {show(value)}")
    return value


def string(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"config field '{name}' must be one of {', '.join(map(repr, choices))}; got {show(value)}")
    return value


def read_json_object(path: Path) -> dict:
    """The JSON object in a config file, or a ConfigError: too large, not UTF-8, not JSON, nested too deep."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is {size} bytes; a config.json is a few kB (at most {MAX_CONFIG_BYTES})")
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None
    try:
        raw = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a config.json") from None
    except ValueError as e:  # JSONDecodeError, or an integer literal too long to convert
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return raw
