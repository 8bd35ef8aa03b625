"""Progress of the long loops (training steps, sampling batches, evaluation batches).

On a terminal: a tqdm bar with rate and ETA. Anywhere else (a log file, a pipe, a batch job):
plain lines on stderr such as ``train: step 120/2000 (6%) 3.1 step/s, elapsed 0:38, ETA 10:05``,
the first and the last always and in between one each time another ``every_pct`` percent of the
total is done or ``every_s`` seconds have passed since the last line, so a log grows by a bounded
number of lines whatever the loop's speed. ``enabled=False`` (``--no-progress``) prints nothing.
No torch here: the command line imports this module before deciding to load a model.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

EVERY_PCT = 10.0  # a line per 10% of the total ...
EVERY_S = 30.0  # ... or per 30 s, whichever comes first


def clock_text(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss`` (the way tqdm writes times)."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or exotic stream: treat as a log
        return False


class Progress:
    """Count ``total`` units of work (``initial`` already done, e.g. on resume) and show it.

    ``clock``: seconds, monotonic (injected by tests); ``tty``: force the bar (True) or the
    lines (False) instead of asking ``stream.isatty()``.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", *, initial: int = 0, enabled: bool = True,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 every_pct: float = EVERY_PCT, every_s: float = EVERY_S, tty: bool | None = None) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self.initial = int(initial)
        self.enabled, self.clock = enabled, clock
        self.stream = stream if stream is not None else sys.stderr
        self.every_pct, self.every_s = every_pct, every_s
        self.postfix: dict[str, Any] = {}
        self.t0 = self.t_line = clock()
        self.n_line = self.initial  # progress at the last printed line
        self.lines = 0
        self.bar = None
        if enabled and (_is_tty(self.stream) if tty is None else tty):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=unit, file=self.stream,
                            dynamic_ncols=True)

    @property
    def is_bar(self) -> bool:
        """True when a terminal bar is drawn (then other output should go through :meth:`write`)."""
        return self.bar is not None

    def rate(self) -> float:
        """Units per second since the start (units done before ``initial`` do not count)."""
        dt = self.clock() - self.t0
        return (self.n - self.initial) / dt if dt > 0 else float("inf")

    def line(self) -> str:
        """The progress line as it stands now."""
        rate, pct = self.rate(), 100.0 * self.n / self.total if self.total else 100.0
        left = self.total - self.n
        eta = "0:00" if left <= 0 else (clock_text(left / rate) if 0 < rate < float("inf") else "?")
        text = (f"{self.desc}: {self.unit} {self.n}/{self.total} ({pct:.0f}%) {rate:.3g} {self.unit}/s, "
                f"elapsed {clock_text(self.clock() - self.t0)}, ETA {eta}")
        extra = ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        return f"{text}; {extra}" if extra else text

    def _due(self) -> bool:
        if self.lines == 0 or self.n >= self.total:
            return True
        step = self.total * self.every_pct / 100.0
        crossed = step > 0 and int(self.n / step) > int(self.n_line / step)
        return crossed or self.clock() - self.t_line >= self.every_s

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        if not self.enabled:
            return
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self._due():
            self._print()

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.t_line, self.n_line, self.lines = self.clock(), self.n, self.lines + 1

    def set_postfix(self, **fields: Any) -> None:
        """Numbers shown beside the count (bar postfix, or appended to the next line)."""
        self.postfix = dict(fields)
        if self.bar is not None and self.enabled:
            self.bar.set_postfix(**fields)

    def write(self, message: str) -> None:
        """Print ``message`` to stdout without breaking the bar."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        """End the bar; a loop stopped early still gets a last line (where it stopped)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.n > self.initial and self.n_line != self.n:
            self._print()
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(items: Iterable[T], total: int, desc: str, unit: str = "batch", **kwargs: Any) -> Iterator[T]:
    """Iterate ``items`` with a :class:`Progress` of ``total`` (keyword options as there)."""
    with Progress(total, desc, unit, **kwargs) as bar:
        for item in items:
            yield item
            bar.update(1)


__all__ = ["EVERY_PCT", "EVERY_S", "Progress", "clock_text", "track"]
