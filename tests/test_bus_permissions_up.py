"""A whole ``aegaeon up`` stack with a NATS user per service (``aegaeon/bus_permissions.py``):
tokens stream, the observer hears the workers, and no log holds a refused subject."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from aegaeon.bench.stack_process import wait_healthy
from aegaeon.servers import free_port


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_aegaeon_up_streams_tokens_with_a_user_per_service_and_no_refusal(
    demo_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every service of the embedded stack as its own role: a streamed completion, the observer
    (``models add``) hears the workers' heartbeats, and neither the server nor any service logs
    a refused subject."""
    port, home = free_port(), tmp_path / "home"
    shm = Path("/dev/shm" if Path("/dev/shm").is_dir() else tmp_path) / f"aegaeon-test-{uuid.uuid4().hex[:8]}"  # fmt: skip
    shm.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AEGAEON_NATS", "AEGAEON_REDIS"))}  # fmt: skip
    env |= {"AEGAEON_SHM_DIR": str(shm), "AEGAEON_HOME": str(home), "AEGAEON_PREFIX": "permup"}
    command = [sys.executable, "-m", "aegaeon.cli", "up", "--models-dir", str(demo_models_dir),
               "--port", str(port), "--workers", "1", "--arena-bytes", str(512 * 1024**2)]  # fmt: skip
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, launcher, 300, f"logs in {home / 'logs'}")
        model = sorted(p.parent.name for p in demo_models_dir.glob("*/config.json"))[0]
        body = {"model": model, "stream": True, "max_tokens": 8,
                "messages": [{"role": "user", "content": "Hello!"}]}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as reply:
            assert reply.status_code == 200
            chunks = [line for line in reply.iter_lines() if line.startswith("data: {")]
        assert len(chunks) >= 2

        connection = json.loads((home / "connection.json").read_text())
        assert connection["AEGAEON_NATS_USER"] == "observer"
        monkeypatch.setenv("AEGAEON_HOME", str(home))
        monkeypatch.setenv("AEGAEON_PREFIX", "permup")
        from aegaeon.model_store.cli import running_workers_slot

        assert running_workers_slot()  # the observer heard the worker's heartbeats
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
        output = launcher.communicate(timeout=120)[0].decode()
        shm.rmdir() if shm.exists() and not any(shm.iterdir()) else None
    assert launcher.returncode == 0, output
    logs = {path.name: path.read_text(errors="replace") for path in (home / "logs").glob("*.log")}
    assert "nats.log" in logs and "gateway.log" in logs
    for name, text in logs.items():
        assert "Violation" not in text and "NATS refused" not in text, (name, text[-2000:])
