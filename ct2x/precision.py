"""The numeric precisions of CT2X's inference engines (`ct2x.reconstruct`, `ct2x.synthesize`): "fp32", or "bf16"
(bfloat16 where each engine says). Torch-free, so that the command line offers them without importing torch."""

from __future__ import annotations

from ct2x.errors import CT2XInputError

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    """CT2XInputError unless `precision` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise CT2XInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
