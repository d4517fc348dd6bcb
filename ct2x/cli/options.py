"""Command-line helpers shared by the `ct2x` commands: errors of the core named by the option that caused them."""

from __future__ import annotations

import contextlib
from typing import Iterator

from ct2x.errors import CT2XInputError


@contextlib.contextmanager
def option(name: str) -> Iterator[None]:
    """Prefix input errors raised by the core with the command-line option that caused them."""
    try:
        yield
    except CT2XInputError as error:
        raise CT2XInputError(f"{name}: {error}") from None
