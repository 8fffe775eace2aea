"""Run ``aegaeon up`` as a child process and wait until it serves — for benchmarks and tests
that must exercise the real stack exactly as a user starts it.

Unless the environment names one (``AEGAEON_NATS_URL``), the stack gets a NATS server started
here rather than by ``aegaeon up``, so the caller knows its address and can watch the stack's
messages beside it (worker events, token batches) as a second subscriber."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from aegaeon.children import parent_death_hook
from aegaeon.servers import ServerProcess, free_port, start_nats
from aegaeon.subjects import Subjects


class StackProcess:
    """``with StackProcess(home, models_dir=..., workers=1) as stack: stack.url ...``"""

    def __init__(
        self,
        home: Path,
        *,
        models_dir: Path | None = None,
        workers: int = 1,
        policy: str | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 180.0,
    ) -> None:
        self.home = Path(home)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["--home", str(self.home), "--port", str(self.port), "--workers", str(workers)]
        if models_dir is not None:
            args += ["--models-dir", str(models_dir)]
        if policy is not None:
            args += ["--policy", policy]
        self.args = args + list(extra_args or [])
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen | None = None
        self.nats: ServerProcess | None = None

    @property
    def nats_url(self) -> str:
        """The NATS server the stack's services use."""
        return self.env["AEGAEON_NATS_URL"]

    @property
    def subjects(self) -> Subjects:
        """The stack's subjects (under its ``AEGAEON_PREFIX``)."""
        return Subjects(self.env.get("AEGAEON_PREFIX", "aegaeon"))

    def __enter__(self) -> StackProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        if "AEGAEON_NATS_URL" not in self.env:
            self.nats = start_nats(self.home / "nats", log_file=self.home / "nats.log")
            self.env["AEGAEON_NATS_URL"] = self.nats.url
        log = open(self.home / "up.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aegaeon.cli", "up", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            preexec_fn=parent_death_hook(),  # a killed benchmark leaves no stack behind
        )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        """Block until ``/health`` answers 200 (or the stack dies / the timeout passes)."""
        assert self.process is not None
        wait_healthy(self.url, self.process, self.ready_timeout, f"see {self.log}")

    @property
    def log(self) -> Path:
        return self.home / "up.log"

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, as a user's Ctrl-C would; SIGKILL the group if it does not end in time.
        Then the NATS server started here, if any."""
        try:
            return self._stop_stack(timeout)
        finally:
            if self.nats is not None:
                self.nats.stop()

    def _stop_stack(self, timeout: float) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def wait_healthy(url: str, process: subprocess.Popen, timeout: float, hint: str = "") -> None:
    """Until ``url``/health answers 200; RuntimeError if ``process`` (its ``aegaeon up``) exits
    first, TimeoutError after ``timeout`` s (``hint``: where to look)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"aegaeon up exited ({process.returncode}); {hint}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"stack not healthy after {timeout} s; {hint}")
