"""Long work off Slicer's GUI thread: a worker thread that reports the fraction done and stops when asked.

Only pure computation (torch, numpy) runs in the thread; MRML, VTK and Qt stay on the main thread, which polls the
run (a QTimer in the widget) and takes the result once it is done. torch releases the GIL while it computes, so the
GUI stays responsive.
"""

import threading
import time
from typing import Any, Callable, Optional

Progress = Callable[[float], None]  # fraction of the work done, 0 ... 1


class Cancelled(Exception):
    """The run was cancelled; raised from the progress report, so the work stops at its next report."""


def checked(progress: Optional[Progress], cancel: Optional[threading.Event]) -> Progress:
    """A progress report that raises Cancelled once `cancel` is set, then passes the fraction on to `progress`."""

    def report(fraction: float) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled")
        if progress is not None:
            progress(fraction)

    return report


class BackgroundRun:
    """Runs `work(progress)` in a daemon thread; `work` calls `progress(fraction)` as it goes.

    The GUI polls `fraction`, `eta_s()` and `done`; `cancel()` makes the next progress report raise Cancelled;
    `result()` returns what `work` returned or raises what it raised (Cancelled included).
    """

    def __init__(self, work: Callable[[Progress], Any]) -> None:
        self._work = work
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._result: Any = None
        self._error: Optional[BaseException] = None
        self._started = 0.0  # time.monotonic() at start, s
        self.fraction = 0.0

    def start(self) -> "BackgroundRun":
        self._started = time.monotonic()
        threading.Thread(target=self._run, name="CT2XReconstruct worker", daemon=True).start()
        return self

    def _run(self) -> None:
        report = checked(self._report, self._cancel)
        try:
            self._result = self._work(report)
        except BaseException as error:  # handed to the main thread by result()
            self._error = error
        finally:
            self._done.set()

    def _report(self, fraction: float) -> None:
        self.fraction = min(max(float(fraction), 0.0), 1.0)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelling(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: Optional[float] = None) -> bool:
        """Block until the work ends (or `timeout_s` passes); whether it ended."""
        return self._done.wait(timeout_s)

    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    def eta_s(self) -> Optional[float]:
        """Seconds left, extrapolated from the fraction done so far; None before the first report."""
        if self.fraction <= 0.0:
            return None
        return self.elapsed_s() * (1.0 - self.fraction) / self.fraction

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result
