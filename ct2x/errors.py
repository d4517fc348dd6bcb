"""Errors and warnings for input: each message names the input, the problem and what to do."""


class CT2XInputError(ValueError):
    """Input that CT2X cannot use (unreadable file, not a CT, impossible geometry, ...)."""


class CT2XWarning(UserWarning):
    """Input CT2X can use but has changed or doubts (stored values converted to HU, implausible geometry, ...).

    The command line prints each as `ct2x COMMAND: warning: ...`; Python callers get ordinary `warnings`.
    """
