"""Network configurations: frozen dataclasses that round-trip through JSON, as model files store them."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Type, TypeVar

from ct2x.errors import CT2XInputError

Config = TypeVar("Config", bound="JSONConfig")


class JSONConfig:
    """Mixin for frozen dataclasses whose fields are numbers or tuples of numbers (tuple fields have tuple defaults)."""

    def to_dict(self) -> Dict[str, Any]:
        """The fields as JSON values: tuples become lists."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}

    @classmethod
    def from_dict(cls: Type[Config], data: Mapping[str, Any]) -> Config:
        """The configuration `to_dict` gave; CT2XInputError for a missing, unknown or invalid field."""
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown, missing = sorted(set(data) - set(fields)), sorted(set(fields) - set(data))
        if unknown or missing:
            raise CT2XInputError(
                f"{cls.__name__}: unknown fields {unknown}, missing fields {missing}; expected exactly {list(fields)}"
            )
        values = {
            name: tuple(value) if isinstance(fields[name].default, tuple) and isinstance(value, list) else value
            for name, value in data.items()
        }
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise CT2XInputError(f"{cls.__name__}: {error}") from None


def check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    """ValueError unless `value` is an int (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")


def check_ints(owner: str, name: str, values: Any, length: int, minimum: int) -> None:
    """ValueError unless `values` is a tuple of `length` ints >= `minimum`."""
    if not isinstance(values, tuple) or len(values) != length:
        raise ValueError(f"{owner}.{name} must be a tuple of {length} integers, got {values!r}")
    for value in values:
        check_int(owner, name, value, minimum)
