"""Model architecture configuration (docs/DESIGN.md section 2).

Architecture only: block length, dropout and optimiser settings are not here. The field
defaults are tvq's one source of architecture defaults (`tvq train` shows them); they
are the built-in model's architecture.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from tvq.errors import ConfigError, is_int

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Transformer-VQ model; frozen and hashable.

    e_scale (the output logit scale) defaults to d_model^(-1/2) when not given.
    """

    d_model: int = 256
    d_k: int = 64
    d_v: int = 256
    n_head: int = 2
    n_code: int = 256
    n_layer: int = 4
    n_vocab: int = 259
    mem_len: int = 128
    agg_cache: bool = True
    pe_abs: bool = False
    pe_lam: float = 100_000.0
    e_tie: bool = True
    e_preln: bool = True
    e_scale: float | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("d_model", "d_k", "d_v", "n_head", "n_code", "n_layer", "n_vocab"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not is_int(self.mem_len) or self.mem_len < 0:
            raise ConfigError(f"mem_len must be a non-negative integer, got {self.mem_len!r}")
        if self.d_model % 2:
            raise ConfigError(f"d_model must be even (sinusoids), got {self.d_model}")
        if not (isinstance(self.pe_lam, int | float) and math.isfinite(self.pe_lam)) or (
            self.pe_lam <= 0
        ):
            raise ConfigError(f"pe_lam must be a positive number, got {self.pe_lam!r}")
        if self.e_scale is None:
            object.__setattr__(self, "e_scale", self.d_model**-0.5)
        if not (isinstance(self.e_scale, int | float) and math.isfinite(self.e_scale)):
            raise ConfigError(f"e_scale must be a finite number, got {self.e_scale!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, ignore_extra: bool = False) -> ModelConfig:
        """Builds a config from a dict; 0/1 become booleans, dtypes may be numpy names."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - set(names))
        if extra and not ignore_extra:
            raise ConfigError(f"unknown config field(s): {', '.join(extra)}")
        kwargs: dict[str, Any] = {}
        for name, field in names.items():
            if name not in data:
                continue
            value = data[name]
            default = field.default
            try:
                if isinstance(default, bool):
                    if value not in (0, 1, True, False):
                        raise ValueError
                    value = bool(value)
                elif isinstance(default, int):
                    if isinstance(value, float) and value.is_integer():
                        value = int(value)
                    if not isinstance(value, int):
                        raise ValueError
                elif isinstance(default, float) or name == "e_scale":
                    value = float(value)
                elif isinstance(default, str):
                    value = str(value)
            except (TypeError, ValueError):
                raise ConfigError(f"config field {name} has an invalid value {value!r}") from None
            kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(data)
