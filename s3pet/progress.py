"""Progress of a long loop: a tqdm bar on a terminal, periodic log lines otherwise.

A bar redrawn into a file or a pipe floods it (tens of kilobytes of carriage returns for the
main job), so when stderr is not a terminal the same progress becomes a log line at every
tenth of the loop and at least every ``every_s`` seconds::

    search: step 32/64 (50%) · loss_w 0.534 · loss_alpha 0.525 · 1m01s elapsed, ~1m02s left

``delay_s`` shows nothing for loops that end sooner (evaluations are mostly short). While the
console shows a bar, the lines still go to the run's ``log.txt``.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("s3pet.progress")
# While a bar is drawn, the same periodic lines go here: only to run logs (``rundir.RUN_LOG``),
# so that ``<run>/log.txt`` holds the progress whether or not the console is a terminal.
file_only = logging.getLogger("s3pet.runlog")
file_only.propagate = False


def _clock(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(desc: str, n: int, total: int, fields: dict[str, str], elapsed: float,
                  unit: str = "step", done_here: int | None = None) -> str:
    """One readable progress line: stage, step/total (percent), fields, elapsed and remaining.

    ``done_here``: steps done in ``elapsed`` (fewer than ``n`` for a resumed run); default ``n``."""
    pct = f" ({100 * n / total:.0f}%)" if total else ""
    parts = [f"{desc}: {unit} {n:,}/{total:,}{pct}"] + [f"{k} {v}" for k, v in fields.items()]
    rate_n = n if done_here is None else done_here
    left = f", ~{_clock(elapsed * (total - n) / rate_n)} left" if rate_n > 0 and n < total else ""
    return " · ".join(parts) + f" · {_clock(elapsed)} elapsed{left}"


class Progress:
    """A loop's progress (``update``, ``set``, ``close``), drawn as a bar or written as log lines.

    Args:
        total: steps of the loop; ``initial``: steps already done (a resumed run).
        desc: the stage ("search", "train", "eval"), first word of every line.
        enabled: False shows nothing (``--no-progress``).
        bar: True a tqdm bar, False log lines; None (default) a bar only when stderr is a terminal.
        every_s: longest time between two log lines.
        tenths: a log line at every tenth of the loop (False: only every ``every_s``, for short
            loops such as evaluations, whose tenths would come seconds apart).
        delay_s: nothing is shown before this many seconds have passed.
        unit: what a step is called in log lines ("step", "batch").
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True, initial: int = 0,
                 bar: bool | None = None, every_s: float = 60.0, tenths: bool = True, delay_s: float = 0.0,
                 unit: str = "step"):
        self.total, self.desc, self.n, self.unit = int(total), desc, int(initial), unit
        self.enabled = enabled
        self.every_s, self.delay_s, self.tenths = every_s, delay_s, tenths
        self.fields: dict[str, str] = {}
        self._t0 = time.perf_counter()
        self._start = self.n
        self._last_t = self._t0
        self._last_tenth = self._tenth(self.n)
        self._logged_n: int | None = None
        self._bar = None
        if enabled and (bar if bar is not None else _is_terminal()):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, leave=False, dynamic_ncols=True,
                             delay=delay_s)

    def _tenth(self, n: int) -> int:
        return 10 * n // self.total if self.total else 0

    def set(self, **fields) -> None:
        """Values shown after the step count (already formatted strings or numbers)."""
        self.fields = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in fields.items()}
        if self._bar is not None:
            self._bar.set_postfix(self.fields, refresh=False)

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps; writes a log line when a tenth is crossed or ``every_s`` passed."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        if not self.enabled:
            return
        now = time.perf_counter()
        tenth = self._tenth(self.n)
        if now - self._t0 < self.delay_s:
            self._last_tenth = tenth
            return
        if (self.tenths and tenth > self._last_tenth) or now - self._last_t >= self.every_s:
            self._emit(now)
        self._last_tenth = tenth

    def _emit(self, now: float) -> None:
        line = progress_line(self.desc, self.n, self.total, self.fields, now - self._t0, self.unit,
                             self.n - self._start)
        (log if self._bar is None else file_only).info(line)
        self._last_t, self._logged_n = now, self.n

    def close(self) -> None:
        """End the bar; write the last state unless it was just written."""
        now = time.perf_counter()
        if self.enabled and self._logged_n is not None and self._logged_n != self.n \
                and now - self._t0 >= self.delay_s:
            self._emit(now)
        self.enabled = False
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
