"""`ct2x <command> [options]`: the entry point; each command lives in its own module `ct2x.cli.<command>`.

A command module provides `add_parser(subparsers)` (registers its options, light imports only, so `ct2x --help`
stays fast) and `run(args) -> int` (does the work; heavy imports such as torch go inside it). Adding a command is a
new module plus one name in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
import threading
import warnings
from typing import Callable, List, Optional, Sequence

from ct2x import __version__
from ct2x.errors import CT2XInputError, CT2XWarning

COMMANDS = ("drr", "prepare", "train", "evaluate", "models", "reconstruct", "synth")  # module names under ct2x.cli

# argparse reads a value such as "-90:90:30" or "-30,0,30" as an unknown option; such tokens are values, never options.
_NEGATIVE_LIST = re.compile(r"^-\.?\d[\d.]*[:,]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ct2x", description="CT to X-ray and X-ray to CT. Run `ct2x COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"ct2x {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"ct2x.cli.{name}")
        module.add_parser(subparsers).set_defaults(run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `ct2x` with `argv` (default: sys.argv[1:]) and return the exit status.

    0 success, 1 the system refused (e.g. a folder cannot be written), 2 bad input (message on stderr, no
    traceback), 128 + N stopped by signal N: 130 Ctrl-C (SIGINT), 143 SIGTERM, 129 SIGHUP (nothing half-written is
    left behind).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(_attach_negative_lists(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_request:  # --help, --version or a usage error already printed by argparse
        return exit_request.code if isinstance(exit_request.code, int) else 2
    prog = f"ct2x {args.command}"
    restore_signal_handlers = _stop_on_signals()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", CT2XWarning)  # every notice about the input, each time
            warnings.showwarning = _notice_printer(prog, warnings.showwarning)
            return args.run(args)
    except CT2XInputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interruption:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 128 + getattr(interruption, "signal_number", signal.SIGINT)
    finally:
        restore_signal_handlers()


def _notice_printer(prog: str, show_other: Callable) -> Callable:
    """A `warnings.showwarning` that prints a CT2XWarning as `PROG: warning: MESSAGE` (above any progress bar)."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, CT2XWarning):
            show_other(message, category, filename, lineno, file, line)
            return
        from tqdm import tqdm

        tqdm.write(f"{prog}: warning: {message}", file=sys.stderr)
    return show


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that the same cleanup runs."""

    def __init__(self, signal_number: int):
        super().__init__(signal_number)
        self.signal_number = signal_number


def _stop_on_signals() -> Callable[[], None]:
    """Make SIGTERM and SIGHUP (where they exist) raise Stopped; returns the function that restores the old handlers.

    Python lets only the main thread set handlers; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    numbers = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {number: signal.signal(number, _raise_stopped) for number in numbers}

    def restore() -> None:
        for number, handler in previous.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be put back from here
                signal.signal(number, handler)
    return restore


def _raise_stopped(signal_number: int, frame) -> None:
    raise Stopped(signal_number)


def _attach_negative_lists(argv: Sequence[str]) -> List[str]:
    """["--angles", "-90:90:30"] -> ["--angles=-90:90:30"], so argparse takes the value for what it is."""
    tokens: List[str] = []
    for token in argv:
        if _NEGATIVE_LIST.match(token) and tokens and tokens[-1].startswith("--") and "=" not in tokens[-1]:
            tokens[-1] = f"{tokens[-1]}={token}"
        else:
            tokens.append(token)
    return tokens


if __name__ == "__main__":
    sys.exit(main())
