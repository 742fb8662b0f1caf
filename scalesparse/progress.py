"""Training progress that a person sees, and the driver's output while a run is on.

Rank 0 runs inside a Ray worker, whose output reaches the driver only as log lines, prefixed and one
line at a time: a bar drawn there with carriage returns never reaches the user's terminal. So rank 0
draws nothing; it reports (`RemoteProgress`: a few times a second and at every log step) and the
driver, which owns the terminal, draws (`ProgressView`): a bar (loss, tokens/s, ETA) on a terminal,
one plain line per log step when the output is piped or logged.

`Console` holds the driver's stdout and stderr while a run is on: every line goes to the run's log
file (`train.log`), and to the terminal unless it is one of Ray's or DeepSpeed's routine notices
(`ROUTINE`); lines are written above the bar, never into it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TextIO


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def set_description(self, desc: str) -> Any: ...
    def write(self, line: str) -> Any: ...
    def close(self) -> Any: ...


ProgressFactory = Callable[[int, str], Progress]


def tqdm_progress(total: int, desc: str) -> Progress:
    """A bar drawn by this process (a worker loop run in-process, whose output is the user's)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True)


class LineProgress:
    """Progress for output that is not a terminal (`make demo | tee log`, a Ray Job's log): one plain
    line every `every` steps and at the end, where a bar's every refresh would become a line of its own."""

    def __init__(self, total: int, desc: str, every: int, out: Callable[[str], Any] | None = None) -> None:
        self.total, self.desc, self.every = total, desc, max(1, every)
        self.n, self.start_n, self.started, self.t0 = 0, 0, False, time.perf_counter()
        self.out = out or (lambda line: print(line, flush=True))

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if not self.started:  # the loop's first call gives the starting step (> 0 after a resume)
            self.started, self.start_n = True, self.n
            return
        if self.n // self.every > before // self.every or (self.n == self.total and before < self.total):
            self.out(self.line())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def write(self, line: str) -> None:
        self.out(line)

    def close(self) -> None:
        pass

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        done = self.n - self.start_n
        eta = elapsed / done * (self.total - self.n) if done else float("nan")
        return (f"{self.desc} | step {self.n}/{self.total} ({self.n / max(1, self.total):.0%}) | "
                f"{_clock(elapsed)} elapsed, {_clock(eta)} left")  # fmt: skip


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan: nothing measured yet
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class RemoteProgress:
    """Rank 0's side: the loop's progress calls become events for the driver, through `post`.

    A state event {"id", "n", "total", "desc", "closed"} goes out at most every `interval_s`, and
    always at the first update, when the description changed (the loop changes it at every log step,
    so the driver sees each log step's state: its plain lines fall on the same steps) and at the end;
    a line event {"line"} goes out at once, after the state it follows."""

    def __init__(self, post: Callable[[dict[str, Any]], Any], total: int, desc: str, interval_s: float = 0.5) -> None:
        self.post, self.total, self.desc, self.interval_s = post, total, desc, interval_s
        self.id = uuid.uuid4().hex  # a restarted worker group's rank 0 starts a new bar
        self.n, self.sent, self.sent_desc, self.t_sent = 0, None, None, 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        due = time.monotonic() - self.t_sent >= self.interval_s
        if self.sent is None or due or self.desc != self.sent_desc or self.n >= self.total:
            self._send()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def write(self, line: str) -> None:
        if self.sent != self.n or self.sent_desc != self.desc:
            self._send()
        self.post({"line": line})

    def close(self) -> None:
        self._send(closed=True)

    def _send(self, closed: bool = False) -> None:
        self.post({"id": self.id, "n": self.n, "total": self.total, "desc": self.desc, "closed": closed})
        self.sent, self.sent_desc, self.t_sent = self.n, self.desc, time.monotonic()


class ProgressView:
    """The driver's side: draws what rank 0 reports. On a terminal, a bar below the other lines
    (and the plain lines in the run's log only); otherwise the plain lines themselves."""

    def __init__(self, every: int, console: Console | None = None, terminal: bool | None = None) -> None:
        self.every, self.console = every, console
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.id: str | None = None
        self.bar = None  # tqdm, on a terminal
        self.lines: LineProgress | None = None

    def feed(self, events: list[dict[str, Any]]) -> None:
        # under the Console's lock: a line from another thread never lands between a clear and a redraw
        with self.console.lock if self.console is not None else contextlib.nullcontext():
            for event in events:
                if "line" in event:
                    self._say(event["line"])
                else:
                    self._show(event)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            if self.console is not None:
                self.console.bar = None
        self.bar = self.lines = self.id = None

    def _show(self, state: dict[str, Any]) -> None:
        if state["id"] != self.id:  # the first report of a (re)started rank 0
            self.close()
            self.id = state["id"]
            self._start(state)
        else:
            delta = state["n"] - self.lines.n
            self.lines.set_description(state["desc"])
            self.lines.update(delta)
            if self.bar is not None:
                self.bar.set_description(state["desc"], refresh=False)
                self.bar.update(delta)
        if state["closed"]:
            self.close()

    def _start(self, state: dict[str, Any]) -> None:
        log_only = self.console.log_only if self.console is not None else (lambda line: None)
        self.lines = LineProgress(state["total"], state["desc"], self.every, out=log_only if self.terminal else None)
        self.lines.update(state["n"])
        if self.terminal:
            from tqdm import tqdm

            out = self.console.terminal if self.console is not None else sys.stdout
            # a terminal that reports no width (a pty nobody sized, `script` run from a pipe) gets tqdm's
            # empty bar; give it $COLUMNS or 80 instead. miniters=1: tqdm's monitor thread never redraws
            # on its own, outside the Console's lock; reports come a few times a second, each one drawn.
            sized = _columns(out) > 0
            self.bar = tqdm(total=state["total"], initial=state["n"], desc=state["desc"], file=out,
                            dynamic_ncols=sized, ncols=None if sized else shutil.get_terminal_size().columns,
                            unit="step", mininterval=0, miniters=1)  # fmt: skip
            if self.console is not None:
                self.console.bar = self.bar

    def _say(self, line: str) -> None:
        print(line, flush=True)  # through the Console when there is one: logged, and above the bar


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, io.UnsupportedOperation):
        return 0


# Routine notices of a healthy local run: kept in the run's log, not shown. Each names what it matches.
ROUTINE = [
    # Ray 2.60, every new local cluster: token authentication is on (the README says so)
    r"Token authentication is enabled for this Ray cluster",
    # Ray Train's controller, on its own preemption watcher actor (core_worker.cc, logged as an error)
    r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store",
    # DeepSpeed, in each worker: its shared-memory collective op compiled, the accelerator it picked
    r"deepspeed_shm_comm_op built successfully",
    r"Setting ds_accelerator to \w+",
    r"Setting accelerator to CPU",
    # the MoE backend line: the driver says it before the workers start; each worker's rank 0 again
    r"moe: experts run on the '\w+' backend",
    # Ray Train's placement-group cleaner: each second while the State API does not answer it, and
    # its monitor thread's traceback when it cannot find the State API at all (a cluster on loopback)
    r"Failed to query Ray Train Controller actor state",
    r"^(?:\x1b\[[0-9;]*m)?\(PlacementGroupCleaner pid=",
    # Ray Train's controller and workers starting a worker group (the driver's header said how many)
    r"\(TrainController pid=\d+[^()]*\)(?:\x1b\[[0-9;]*m)? (?:Requesting resources: |Attempting to start training "
    r"worker group |Started training worker group of size |- \(ip=[^()]*, pid=\d+\) world_rank=)",
    r"\(RayTrainWorker pid=\d+[^()]*\)(?:\x1b\[[0-9;]*m)? Setting up process group for: ",
]
ROUTINE_PATTERN = "|".join(f"(?:{p})" for p in ROUTINE)
_ROUTINE = re.compile(ROUTINE_PATTERN)


def routine(line: str) -> bool:
    return _ROUTINE.search(line) is not None


# A line Ray forwards from one of its processes: "(RayTrainWorker pid=123, ip=...) text", maybe colored
_FORWARDED = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?:[^()]*\s)?pid=\d+[^()]*\)(?:\x1b\[[0-9;]*m)?\s?")
_TRACEBACK_GOES_ON = re.compile(r"^(?:Traceback |\s|$|During handling of the above|The above exception)")
# Ray Train's controller deciding on a failed group: its errors, their tracebacks and the group's
# shutdown follow, up to the controller's next start of a group (after a RETRY)
_CONTROLLER_FAILED = re.compile(r"^\[FailurePolicy\]")
_CONTROLLER_GOES_ON = re.compile(r"^(?:Requesting resources|Attempting to start training worker group)")
# Ray Train's preemption watcher, on a node that drains (one line)
_PREEMPTION_SEEN = re.compile(r"^PreemptionWatcher: preemption detected")
# Ray's own processes, forwarded with a name instead of a pid: a raylet's account of a lost node ("The
# node with node id ... has been marked dead", "Raylet is terminated ... Last 20 lines of the Raylet
# logs:") or of workers it killed, the GCS's failed clean-up on a dead node; a message goes on in
# indented lines of its own
_RAY_PROCESS = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?:raylet|pid=gcs_server)(?:, ip=[^()]*)?\)")


class _FailureNotices:
    """Ray's own account of a failure: a Ray Train worker's traceback ("Error in training function:"
    and the lines after it, from that process), the controller's failure decision and what follows it,
    the preemption watcher's notice, a raylet's or the GCS's report of a lost node or worker. The
    driver says what failed in one line (and, with fault tolerance, what it does next); these stay in
    the log only."""

    def __init__(self) -> None:
        self.inside: dict[str, str] = {}  # source (the forwarded prefix) → "traceback" or "controller"
        self.message_goes_on = False  # the last line was a hidden message of one of Ray's own processes

    def hidden(self, text: str) -> bool:
        if _RAY_PROCESS.match(text):
            self.message_goes_on = True
            return True
        m = _FORWARDED.match(text)
        if m is None:  # an unprefixed line: the rest of a hidden message when it is indented or blank
            self.message_goes_on = self.message_goes_on and not text.rstrip("\n")[:1].strip()
            return self.message_goes_on
        self.message_goes_on = False
        source, body = m.group(0).strip(), text[m.end():].rstrip("\n")
        if body.startswith("Error in training function"):
            self.inside[source] = "traceback"
            return True
        if _CONTROLLER_FAILED.match(body):
            self.inside[source] = "controller"
            return True
        if _PREEMPTION_SEEN.match(body):
            return True
        block = self.inside.get(source)
        if block is None:
            return False
        if block == "controller":
            if not _CONTROLLER_GOES_ON.match(body):
                return True
        elif _TRACEBACK_GOES_ON.match(body):
            return True
        elif re.match(r"^[\w.]+(?:Error|Exception|Interrupt|Exit)\b", body):  # the exception itself: the end
            return True  # (a chained one follows with "During handling...", matched above)
        del self.inside[source]
        return False


REPEAT_WINDOW_S = 5.0


class _Repeats:
    """Forwarded lines seen in the last REPEAT_WINDOW_S seconds. Two Ray nodes started on one machine
    share one log folder, and each node's log monitor forwards every line of it: the driver receives
    each worker line twice (same process, same text). A process that really prints the same line
    twice within seconds loses the second copy; Ray's own deduplication already does more."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}

    def repeated(self, text: str) -> bool:
        if not _FORWARDED.match(text):
            return False
        now = time.monotonic()
        if len(self.seen) > 1000:
            self.seen = {k: t for k, t in self.seen.items() if now - t < REPEAT_WINDOW_S}
        last = self.seen.get(text)
        if last is not None and now - last < REPEAT_WINDOW_S:
            del self.seen[text]  # the copy: a third identical line counts as new
            return True
        self.seen[text] = now
        return False


_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def _plain(text: str) -> str:
    """`text` for a file or a pipe: without the colour codes Ray puts on its prefixes whatever the
    stream is, and a line a worker's progress bar redrew with carriage returns in its final state
    ("(pid=1) \\rA\\rB" → "(pid=1) B")."""
    text = _COLOURS.sub("", text)
    if "\r" not in text.rstrip("\r\n"):
        return text
    m = _FORWARDED.match(text)
    prefix, body = (m.group(0), text[m.end():]) if m else ("", text)
    drawn = [part for part in body.rstrip("\n").split("\r") if part.strip()]
    return prefix + (drawn[-1] if drawn else "") + "\n"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, AttributeError):
        return False


class Console:
    """sys.stdout and sys.stderr while a run is on (a context manager): each whole line goes to
    `log_path` and, unless `routine`, to the terminal, above the progress bar (`bar`) if one is drawn.

    Ray prints its workers' output (and its own warnings) through sys.stdout and sys.stderr as they
    are at the time of each line, from its own threads; so replacing them catches those lines too."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = Path(log_path)
        self.lock = threading.RLock()
        self.bar = None  # a tqdm bar drawn on `terminal` (set by ProgressView)
        self.terminal: TextIO = sys.stdout
        self._saved: tuple[TextIO, TextIO] | None = None
        self._log: TextIO | None = None
        self._repeats = _Repeats()
        self._failures = _FailureNotices()
        self.last_forwarded: float | None = None  # when the last line Ray forwarded from a worker arrived
        self.muted = False  # every line to the log only (set while a run is being stopped: see mute)

    def __enter__(self) -> Console:
        self._saved = (sys.stdout, sys.stderr)
        self.terminal = sys.stdout
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", buffering=1)
        self._log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
        sys.stdout, sys.stderr = _Lines(self, sys.stdout), _Lines(self, sys.stderr)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._drain()
        finally:  # (a second Ctrl-C while draining still restores the streams and closes the log)
            self._restore()

    def _restore(self) -> None:
        with self.lock:
            for stream in (sys.stdout, sys.stderr):
                if isinstance(stream, _Lines):
                    stream.flush_partial()
            if self._saved is not None:
                sys.stdout, sys.stderr = self._saved
            if self._log is not None:
                self._log.close()
                self._log = None

    def emit(self, text: str, real: TextIO) -> None:
        """One whole line (with its newline) from `real`'s writers."""
        with self.lock:
            if self._repeats.repeated(text):
                return
            if _FORWARDED.match(text):
                self.last_forwarded = time.monotonic()
            plain = _plain(text)
            if self._log is not None:
                self._log.write(plain)
            if self._failures.hidden(text) or routine(text) or self.muted:  # (hidden first: it follows every line)
                return
            bar = self.bar
            if bar is not None:
                bar.clear()
            real.write(text if _isatty(real) else plain)  # a pipe or file gets no escape codes
            real.flush()
            if bar is not None:
                bar.refresh()

    def _drain(self, quiet_s: float = 2.0, limit_s: float = 8.0) -> None:
        """Ray forwards the workers' last lines a moment after they finished (its log monitor tails
        their files); once workers have spoken, wait until they have been quiet for `quiet_s` (at most
        `limit_s`), so that no late line reaches the terminal past this Console, unfiltered."""
        if self.last_forwarded is None:
            return
        deadline = time.monotonic() + limit_s
        while time.monotonic() < min(deadline, self.last_forwarded + quiet_s):
            time.sleep(0.05)

    def mute(self) -> None:
        """From now on every line goes to the log only: while a run is stopped on purpose (Ctrl-C), Ray's
        processes report, in their own words and tracebacks, that they were cut off (its Train controller:
        'Failed to send resource request', GetTimeoutError); the driver says what happened in one line."""
        with self.lock:
            self.muted = True

    def log_only(self, line: str) -> None:
        with self.lock:
            if self._log is not None:
                self._log.write(line + "\n")


class _Lines(io.TextIOBase):
    """A text stream that hands whole lines to its Console."""

    def __init__(self, console: Console, real: TextIO) -> None:
        self.console, self.real, self.partial = console, real, ""

    def write(self, s: str) -> int:
        with self.console.lock:
            text = self.partial + s
            *lines, self.partial = text.split("\n")
            for line in lines:
                self.console.emit(line + "\n", self.real)
        return len(s)

    def flush_partial(self) -> None:
        if self.partial:
            text, self.partial = self.partial, ""
            self.console.emit(text + "\n", self.real)

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return self.real.isatty()

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8")

    def writable(self) -> bool:
        return True
