"""Progress of a data preparation, on stdout (stderr is kept for problems, one line each).

On a terminal, a bar: input MB read, MB/s and an ETA when the input's size is known (local files),
with documents/s and tokens/s beside it. When the output is piped or logged, plain lines instead, as
`scalesparse.progress.LineProgress` writes them for training: one every 5 % of the input (every 64 MB
of text when its size is not known) and one at the end. A preparation that ends within `quiet_s`
shows nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from scalesparse.progress import LineProgress, _clock

UNKNOWN_EVERY = 64_000_000  # text bytes between plain lines when the input's size is not known


class PrepProgress:
    def __init__(self, total_bytes: int | None, *, terminal: bool | None = None, quiet_s: float = 5.0,
                 out: Callable[[str], Any] | None = None) -> None:  # fmt: skip
        self.total = total_bytes
        self.docs = self.chars = self.tokens = self._done = 0
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.bar = None
        self.lines: _PlainLines | None = None
        if self.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, desc="data", unit="B", unit_scale=True, unit_divisor=1000,
                            file=sys.stdout, dynamic_ncols=True, delay=quiet_s, mininterval=0.5)  # fmt: skip
        else:
            self.lines = _PlainLines(self, quiet_s, out)

    @property
    def position(self) -> int:
        """What the bar and the lines count: input bytes when their total is known, else text read."""
        return self._done if self.total is not None else self.chars

    def update(self, docs: int, chars: int, tokens: int, done_bytes: int) -> None:
        before = self.position
        self.docs, self.chars, self.tokens = self.docs + docs, self.chars + chars, self.tokens + tokens
        self._done = done_bytes
        step = max(0, self.position - before)
        if self.bar is not None:
            self.bar.set_postfix_str(self.rates(), refresh=False)
            self.bar.update(step)
        else:
            self.lines.update(step)

    def rates(self) -> str:
        dt = max(self.elapsed, 1e-9)
        return f"{self.docs:,} docs, {self.docs / dt:,.0f} docs/s, {self.tokens / dt / 1e6:,.2f} M tok/s"

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - (self.lines.t0 if self.lines is not None else self.bar.start_t)

    def close(self, complete: bool = True) -> None:
        """The end of the preparation; `complete=False` when it failed: the bar's line is ended where it
        stood (so an error prints on a line of its own), and no final line claims it is done."""
        if self.bar is not None:
            if complete and self.total is not None and self.bar.n < self.total:  # a streamed estimate fell short
                self.bar.update(self.total - self.bar.n)
            self.bar.close()
        elif complete:
            self.lines.finish()


class _PlainLines(LineProgress):
    """LineProgress's plain lines, counting bytes instead of steps, saying documents and rates."""

    def __init__(self, progress: PrepProgress, quiet_s: float, out: Callable[[str], Any] | None) -> None:
        total = progress.total
        every = max(1, total // 20) if total else UNKNOWN_EVERY
        self.progress, self.quiet_s, self.printed = progress, quiet_s, False
        self.say = out or (lambda line: print(line, flush=True))
        super().__init__(total or 0, "data", every, out=self._emit)
        self.update(0)  # LineProgress takes its first update as the starting point: here, nothing read

    def _emit(self, line: str) -> None:
        if time.perf_counter() - self.t0 >= self.quiet_s:
            self.printed = True
            self.say(line)

    def finish(self) -> None:
        if self.printed or time.perf_counter() - self.t0 >= self.quiet_s:
            self.say(self.line(final=True))

    def line(self, final: bool = False) -> str:
        p, elapsed = self.progress, time.perf_counter() - self.t0
        mb_s = p.chars / 1e6 / max(elapsed, 1e-9)
        head = f"data: {p.chars / 1e6:,.1f} MB of text"
        if p.total and not final:
            share = min(self.n / p.total, 1.0)
            left = elapsed / share * (1 - share) if share > 0 else float("nan")
            head = f"data: {share:.0%} of {p.total / 1e6:,.1f} MB read, {p.chars / 1e6:,.1f} MB of text"
            clock = f"{_clock(elapsed)} elapsed, {_clock(left)} left"
        else:
            clock = f"{_clock(elapsed)} elapsed" + (", done" if final else "")
        return f"{head}, {p.tokens:,} tokens | {mb_s:,.1f} MB/s, {p.rates()} | {clock}"
