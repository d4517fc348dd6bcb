"""What ITK, MetaIO and GDCM print on stderr: kept off the terminal and turned into CT2X's own messages."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
from typing import Callable, Iterator, List, Optional, Tuple, TypeVar

from ct2x.errors import CT2XWarning

T = TypeVar("T")

ITK_WARNING = re.compile(r"WARNING: In [^\n]*, line \d+\n(\w+) \(0x[0-9a-fA-F]+\): (.*?)(?:\n\s*\n|\Z)", re.S)
ITK_WARNINGS_HANDLED = {  # part of an ITK warning -> what CT2X says instead ("" = nothing: CT2X checks it itself)
    "Non uniform sampling or missing slices": "",  # _check_even_slice_spacing judges the slice positions
    "unexpected scales in sform": "its sform and its pixdim disagree on the voxel size; the spacing is taken from "
                                  "pixdim, so check it",
}


# What ITK, MetaIO and GDCM print on stderr: kept off the terminal, turned into CT2X's own messages.


def quietly(action: Callable[[], T]) -> Tuple[Optional[T], Optional[RuntimeError], str]:
    """(result or None, RuntimeError or None, what C++ code printed on stderr meanwhile) of a SimpleITK call."""
    result, failure = None, None
    with _native_stderr_captured() as captured:
        try:
            result = action()
        except RuntimeError as error:
            failure = error
    return result, failure, "".join(captured)


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[List[str]]:
    """Redirect file descriptor 2 (where ITK, MetaIO and GDCM print) into a temporary file; the list gets its text."""
    captured: List[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no stderr (e.g. a GUI without console): nothing to keep off
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def warn_native_output(native: str, source: str) -> None:
    """Each distinct warning ITK printed while reading ``source`` as a CT2XWarning (see ITK_WARNINGS_HANDLED)."""
    reports = [(reporter, " ".join(text.split())) for reporter, text in ITK_WARNING.findall(native)]
    rest = " ".join(ITK_WARNING.sub("", native).split())
    if rest:
        reports.append(("the reader", rest))
    for reporter, text in dict.fromkeys(reports):
        handled = [said for part, said in ITK_WARNINGS_HANDLED.items() if part in text]
        if handled and not handled[0]:
            continue
        said = handled[0] if handled else f"{reporter} reported: {text}"
        warnings.warn(f"{source}: {said}.", CT2XWarning, stacklevel=3)


def sitk_reason(error: RuntimeError) -> str:
    """The last line of a SimpleITK exception, without the C++ source location."""
    return str(error).strip().splitlines()[-1].replace("sitk::ERROR: ", "")
