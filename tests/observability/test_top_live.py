"""``aegaeon top`` in a real terminal (a pseudo-terminal) beside a running stack: the view it
draws follows the stack live, and Ctrl-C ends it cleanly."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable

import httpx

from .conftest import ObservedStack, stream_chat

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")
COLUMNS, ROWS = 160, 60


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """A pseudo-terminal of COLUMNS × ROWS running one command; everything it draws is kept
    (escape sequences stripped) for the test to read."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS),
               "LINES": str(ROWS)}  # fmt: skip
        # As a shell starts a foreground job: Ctrl-C's SIGINT at its default, even when this
        # suite runs in the background (where SIGINT is ignored, and children inherit that).
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                        start_new_session=True, preexec_fn=_default_sigint)  # fmt: skip
        os.close(slave)
        self._master = master
        self._chunks: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            with self._lock:
                self._chunks.append(ANSI.sub("", data.decode(errors="replace")))

    def screen(self) -> str:
        with self._lock:
            return "".join(self._chunks)

    def wait_for(self, found: Callable[[str], bool], after: int = 0, timeout: float = 60.0) -> str:
        """Wait until ``found(text drawn since offset after)`` holds; return that text."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()[after:]
            if found(text):
                return text
            assert self.process.poll() is None, f"top exited early:\n{self.screen()[-3000:]}"
            time.sleep(0.1)
        raise AssertionError(f"not drawn within {timeout} s; last screen:\n{self.screen()[-4000:]}")

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._reader.join(timeout=5)
        os.close(self._master)


def _resident_row(text: str, workers: list[str], model: str) -> bool:
    """Some drawn line shows ``model`` with a worker that holds it (a worker's row, or the
    model's own row with its "resident on")."""
    return any(model in line and any(w in line for w in workers) for line in text.splitlines())


def test_top_draws_the_runtime_view_live_and_ends_on_ctrl_c(observed: ObservedStack):
    url = observed.stack.url
    runtime = httpx.get(f"{url}/v1/aegaeon/runtime", timeout=10).json()
    workers = [w["worker_id"] for w in runtime["workers"]]
    model = next(m["model"] for m in runtime["models"] if not m["resident_on"])
    terminal = Terminal([sys.executable, "-m", "aegaeon.cli", "top", "--gateway", url,
                         "--interval", "0.2"])  # fmt: skip
    try:
        first = terminal.wait_for(lambda t: "workers" in t and all(w in t for w in workers))
        assert "latency and switching" in first and model in first
        assert not _resident_row(first, workers, model)

        drawn_before = len(terminal.screen())
        started = threading.Event()
        stream = threading.Thread(
            target=stream_chat, args=(url, model, 400, {}, started.set), daemon=True
        )
        stream.start()
        assert started.wait(60), "the stream's first token never came"
        # The same running view, redrawn: a worker now holds the model it switched to.
        terminal.wait_for(lambda t: _resident_row(t, workers, model), drawn_before)
        stream.join(120)

        terminal.process.send_signal(signal.SIGINT)
        assert terminal.process.wait(timeout=15) == 0
        assert "Traceback" not in terminal.screen()
    finally:
        terminal.close()
