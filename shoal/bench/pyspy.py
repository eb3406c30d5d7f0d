"""Sampling profiles of server processes with py-spy (optional tool), summarised as the frames
with the most inclusive and self samples."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass


def find_py_spy() -> str | None:
    """The py-spy executable beside this interpreter, else on PATH; None if not installed."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("py-spy")


@dataclass
class Recording:
    """One running `py-spy record` of process `pid` writing folded stacks to `path`."""

    pid: int
    path: str
    proc: subprocess.Popen[bytes]

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop sampling; py-spy writes the file on SIGINT."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def record(pid: int, path: str, rate_hz: int = 100, native: bool = False) -> Recording:
    """Start sampling `pid` (non-blocking: the target is never paused) until `stop()`."""
    exe = find_py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    argv = [exe, "record", "-p", str(pid), "-r", str(rate_hz), "-f", "raw", "-o", path]
    argv += ["--nonblocking", *(["--native"] if native else [])]
    log = open(path + ".log", "wb")  # noqa: SIM115 - closed below, the child keeps its copy
    with contextlib.closing(log):
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    return Recording(pid, path, proc)


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"; keep "function (file.py:123)".
    name, sep, where = frame.partition(" (")
    return f"{name} ({os.path.basename(where)}" if sep else frame


def summarize_folded(path: str, top: int = 40) -> dict[str, object]:
    """`{"samples", "inclusive": [[share, frame]...], "self": [...]}` of a folded-stacks
    file; shares are fractions of all samples (py-spy samples only non-idle threads, so
    samples / rate = busy thread-seconds)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [_frame_name(fr) for fr in stack.split(";")]
            for frame in set(frames):
                inclusive[frame] += n
            own[frames[-1]] += n
    if total == 0:
        return {"samples": 0, "inclusive": [], "self": []}
    return {
        "samples": total,
        "inclusive": [[round(c / total, 4), fr] for fr, c in inclusive.most_common(top)],
        "self": [[round(c / total, 4), fr] for fr, c in own.most_common(top)],
    }
