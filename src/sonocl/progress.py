"""Progress reports that read well in a terminal and in a log file.

A tqdm bar redraws itself with carriage returns, which is right on a terminal and a wall of frames in a log
(``> run.log``, ``nohup``, CI, a job scheduler). `progress_report` returns a tqdm bar when its stream is a terminal and
otherwise a `LineProgress`: the same figures (count/total, percentage, elapsed<remaining, rate, postfix), each
report on a line of its own, at every `LINE_FRACTION` of the total, at least every `LINE_SECONDS`, and at the end;
never more often than every `LINE_MIN_SECONDS`, so that a job of a few seconds (a short epoch) logs one line.
Both offer the part of tqdm's interface that sonocl uses: ``update``, ``set_postfix``, ``write``, ``close`` and
the context manager.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from numbers import Number
from typing import IO, Any, Protocol

from tqdm import tqdm

LINE_FRACTION = 0.1
"""A log line at every tenth of the total…"""
LINE_SECONDS = 30.0
"""…and at least this often (seconds) while something advances, so that a slow or open-ended job shows life…"""
LINE_MIN_SECONDS = 5.0
"""…but never more often than this (seconds): tenths of a fast loop would flood the log."""

_WITH_TOTAL = "{percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_WITHOUT_TOTAL = "{n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


class Progress(Protocol):
    """What sonocl's commands call on a progress report (a subset of tqdm's interface)."""

    def update(self, n: float = 1) -> Any: ...

    def set_postfix(
        self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any
    ) -> None: ...

    def write(self, s: str, file: IO[str] | None = None, end: str = "\n") -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Progress: ...

    def __exit__(self, *exc_info: object) -> None: ...


def is_terminal(file: IO[str]) -> bool:
    """Whether ``file`` is an interactive terminal (a closed or detached stream is not)."""
    try:
        return file.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def progress_report(
    total: int | None,
    desc: str = "",
    unit: str = "it",
    *,
    enabled: bool = True,
    initial: int = 0,
    leave: bool = True,
    position: int | None = None,
    file: IO[str] | None = None,
) -> Progress:
    """A progress report of ``total`` ``unit``\\ s (``None``: open-ended), starting at ``initial``, on ``file``
    (default: ``sys.stderr``): a tqdm bar on a terminal, plain lines otherwise; nothing but ``write`` when not
    ``enabled``. ``leave`` and ``position`` are tqdm's (a bar that vanishes when done; the row of one of several
    concurrent bars); a log keeps every line, so line reports ignore them."""
    file = sys.stderr if file is None else file
    if enabled and is_terminal(file):
        return tqdm(
            total=total,
            desc=desc or None,
            unit=unit,
            initial=initial,
            leave=leave,
            position=position,
            file=file,
            dynamic_ncols=True,
            mininterval=1.0,
        )
    return LineProgress(total, desc, unit, enabled=enabled, initial=initial, file=file)


class LineProgress:
    """tqdm's figures as whole lines (never a carriage return): the progress report for logs."""

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        unit: str = "it",
        *,
        enabled: bool = True,
        initial: int = 0,
        file: IO[str] | None = None,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.enabled = enabled
        self.initial = initial
        self.n: float = initial
        self.postfix = ""
        self.file = sys.stderr if file is None else file
        self._started = self._last_line_at = time.monotonic()
        self._reported: tuple[float, str] = (initial, "")
        self._next_mark = self._mark_after(initial)
        self._closed = False

    def _mark_after(self, n: float) -> float:
        """The count at which the next tenth of the total is reached (infinite without a total)."""
        if not self.total:
            return math.inf
        step = LINE_FRACTION * self.total
        return (math.floor(n / step + 1e-9) + 1) * step

    def format_line(self) -> str:
        """The current figures in tqdm's notation, without the bar."""
        template = _WITH_TOTAL if self.total else _WITHOUT_TOTAL
        figures = tqdm.format_meter(
            self.n,
            self.total,
            time.monotonic() - self._started,
            unit=self.unit,
            postfix=self.postfix or None,
            bar_format=template,
            initial=self.initial,
        )
        return f"{self.desc}: {figures}" if self.desc else figures

    def _report(self) -> None:
        print(self.format_line(), file=self.file, flush=True)
        self._last_line_at = time.monotonic()
        self._reported = (self.n, self.postfix)
        self._next_mark = self._mark_after(self.n)

    def update(self, n: float = 1) -> None:
        self.n += n
        since_last = time.monotonic() - self._last_line_at
        at_mark = self.n >= self._next_mark - 1e-9 and since_last >= LINE_MIN_SECONDS
        if self.enabled and (at_mark or since_last >= LINE_SECONDS):
            self._report()

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Figures shown after the rate, formatted as tqdm does (keyword arguments in alphabetical order)."""
        items = {**(ordered_dict or {}), **{key: kwargs[key] for key in sorted(kwargs)}}
        self.postfix = ", ".join(
            f"{key}={tqdm.format_num(value) if isinstance(value, Number) else str(value).strip()}"
            for key, value in items.items()
        )

    def write(self, s: str, file: IO[str] | None = None, end: str = "\n") -> None:
        """Print a message (to ``file``, default ``sys.stdout`` as tqdm's): in a log it cannot collide with a bar."""
        print(s, file=sys.stdout if file is None else file, end=end, flush=True)

    def close(self) -> None:
        """The final line, unless the last one already said it all (or nothing happened: an empty total)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled and (self.n, self.postfix) != self._reported and (self.total != 0 or self.n):
            self._report()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
