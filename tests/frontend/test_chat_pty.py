"""`shoal chat` in a terminal (a pty that is the process's controlling terminal, so Ctrl-C and
Ctrl-D are typed characters): Ctrl-C stops the current reply, a second Ctrl-C or a Ctrl-D at
the prompt exits 0, and no traceback is ever printed."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator

import pytest

ENGINE_FLAGS = ["--load-format", "dummy", "--num-blocks", "128", "--max-model-len", "2048"]
TIMEOUT_S = 120.0
CTRL_C, CTRL_D = b"\x03", b"\x04"


class Terminal:
    """A child process on a pty; `expect` reads its output until a pattern shows up."""

    def __init__(self, argv: list[str], preexec_fn: Callable[[], None] | None = None) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            preexec_fn=preexec_fn or _own_terminal,
            close_fds=True,
        )
        os.close(slave)
        self.output = b""

    def expect(self, pattern: bytes, after: int = 0, timeout_s: float = TIMEOUT_S) -> int:
        """Wait until `pattern` (a regex) matches the output past offset `after`; returns
        the end of the match."""
        deadline = time.monotonic() + timeout_s
        while True:
            match = re.compile(pattern).search(self.output, after)
            if match:
                return match.end()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{pattern!r} not seen in {self.output[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                assert chunk, f"EOF before {pattern!r}: {self.output[-2000:]!r}"
                self.output += chunk

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self) -> int:
        """The exit code, reading the terminal meanwhile (a child blocked on a full terminal
        would never exit)."""
        deadline = time.monotonic() + TIMEOUT_S
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"still running: {self.output[-2000:]!r}"
            self._drain(0.1)
        self._drain(0.1)
        return self.proc.returncode

    def _drain(self, timeout_s: float) -> None:
        while select.select([self.master], [], [], timeout_s)[0]:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                return
            if not chunk:
                return
            self.output += chunk

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT_S)
        os.close(self.master)


def _own_terminal() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _ignoring_sigint() -> None:
    """How a background job of a non-interactive shell starts (`cmd &` in a CI script)."""
    _own_terminal()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _chat_argv(tiny_model_dir: str) -> list[str]:
    argv = [sys.executable, "-m", "shoal.entrypoints.cli", "chat", "--model", tiny_model_dir]
    return [*argv, *ENGINE_FLAGS, "--max-tokens", "1800", "--ignore-eos", "--temperature", "0"]


@pytest.fixture
def chat(tiny_model_dir: str) -> Iterator[Terminal]:
    terminal = Terminal(_chat_argv(tiny_model_dir))
    try:
        yield terminal
    finally:
        terminal.close()
    assert b"Traceback" not in terminal.output, terminal.output.decode(errors="replace")


def test_ctrl_c_stops_the_reply_and_a_second_one_exits(chat: Terminal) -> None:
    at = chat.expect(rb"> $")
    chat.type(b"Tell me a long story.\n")
    at = chat.expect(rb"story\.\r?\n", at)
    at = chat.expect(rb"\S{20}", at)  # the reply is streaming
    chat.type(CTRL_C)
    at = chat.expect(rb"\[stopped\]\r?\n> ", at)
    # The conversation goes on after a stopped reply.
    chat.type(b"And then?\n")
    at = chat.expect(rb"then\?\r?\n", at)
    at = chat.expect(rb"\S{5}", at)  # streaming again
    chat.type(CTRL_C)
    at = chat.expect(rb"\[stopped\]\r?\n> ", at)
    chat.type(CTRL_C)
    assert chat.wait() == 0


def test_ctrl_d_at_the_prompt_exits(chat: Terminal) -> None:
    chat.expect(rb"> $")
    chat.type(CTRL_D)
    assert chat.wait() == 0


def test_ctrl_c_twice_at_the_prompt_exits(chat: Terminal) -> None:
    at = chat.expect(rb"> $")
    chat.type(CTRL_C)
    at = chat.expect(rb"Ctrl-C again or Ctrl-D to exit\)\r?\n> ", at)
    chat.type(CTRL_C)
    assert chat.wait() == 0


def test_ctrl_c_works_when_started_with_sigint_ignored(tiny_model_dir: str) -> None:
    """Started the way a script's background job is (SIGINT ignored, so Python installs no
    KeyboardInterrupt handler), Ctrl-C still stops a reply and exits at the prompt."""
    chat = Terminal(_chat_argv(tiny_model_dir), preexec_fn=_ignoring_sigint)
    try:
        at = chat.expect(rb"> $")
        chat.type(b"Tell me a long story.\n")
        at = chat.expect(rb"\S{20}", chat.expect(rb"story\.\r?\n", at))
        chat.type(CTRL_C)
        at = chat.expect(rb"\[stopped\]\r?\n> ", at)
        chat.type(CTRL_C)
        assert chat.wait() == 0
    finally:
        chat.close()
    assert b"Traceback" not in chat.output, chat.output.decode(errors="replace")
