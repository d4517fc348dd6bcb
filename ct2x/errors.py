"""Errors raised for bad input: each message names the input, the problem and what to do."""


class CT2XInputError(ValueError):
    """Input that CT2X cannot use (unreadable file, not a CT, impossible geometry, ...)."""
