"""``aegaeon up``: restart decisions, child supervision, and a real start-answer-stop smoke test."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from aegaeon.children import Child, make_private_dir, remove_stale_shm
from aegaeon.launcher import Stack, _port_free, ready_banner
from aegaeon.servers import free_port
from aegaeon.supervisor import Backoff, RestartPlanner

# ---------------------------------------------------------------- restart decisions (pure)


def test_backoff_doubles_then_stays_at_its_maximum() -> None:
    backoff = Backoff(initial=0.5, factor=2, maximum=3)
    assert [backoff.delay(k) for k in range(1, 6)] == [0.5, 1, 2, 3, 3]


def test_repeated_crashes_wait_longer_each_time() -> None:
    planner = RestartPlanner(Backoff(initial=1, factor=2, maximum=60, stable_after=100))
    planner.started("gateway", 0)
    assert planner.exited("gateway", 1) == 1
    assert planner.due(1.5) == [] and planner.due(2) == ["gateway"]
    planner.started("gateway", 2)
    assert planner.exited("gateway", 3) == 2
    planner.started("gateway", 5)
    assert planner.exited("gateway", 6) == 4


def test_a_crash_after_a_stable_run_starts_the_backoff_over() -> None:
    planner = RestartPlanner(Backoff(initial=1, factor=2, maximum=60, stable_after=10))
    planner.started("worker-0", 0)
    planner.exited("worker-0", 1)
    planner.started("worker-0", 2)
    planner.exited("worker-0", 3)
    planner.started("worker-0", 4)
    assert planner.exited("worker-0", 50) == 1


def test_services_become_due_in_order_and_only_once_restarted() -> None:
    planner = RestartPlanner(Backoff(initial=1, factor=2, maximum=60))
    planner.started("a", 0)
    planner.started("b", 0)
    planner.exited("b", 1)
    planner.exited("a", 1.5)
    assert planner.due(10) == ["b", "a"]
    assert planner.waiting("a")
    planner.started("a", 10)
    assert planner.due(10) == ["b"] and not planner.waiting("a")


def test_ready_banner_shows_the_endpoint_and_a_request_to_paste() -> None:
    banner = ready_banner("http://127.0.0.1:8123", ["demo-llama", "demo-qwen2"])
    assert "http://127.0.0.1:8123/v1" in banner
    assert "curl -N http://127.0.0.1:8123/v1/chat/completions" in banner
    assert '"model": "demo-llama"' in banner


# ---------------------------------------------------------------- supervision of real processes


def _stack(tmp_path: Path, **overrides) -> Stack:
    args = argparse.Namespace(home=tmp_path, grace=2.0, port=free_port(), ready_timeout=5.0)
    vars(args).update(overrides)
    stack = Stack(args)
    stack.planner = RestartPlanner(Backoff(initial=0.1, factor=2, maximum=0.4))
    return stack


def test_a_crashed_service_is_restarted_and_the_restart_is_logged(tmp_path: Path, capsys) -> None:
    stack = _stack(tmp_path)
    crash = [sys.executable, "-c", "raise SystemExit(3)"]
    child = Child("worker-0", "worker", crash, tmp_path / "w.log")
    stack.children = [child]
    child.start(stack.env)
    stack.planner.started("worker-0", time.monotonic())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (tmp_path / "w.log").read_text().count("starting") < 3:
        stack.supervise_once()
        time.sleep(0.05)
    stack.stop()
    assert (tmp_path / "w.log").read_text().count("starting") >= 3
    out = capsys.readouterr().out
    assert "worker-0 exited with code 3; restarting in 0.1 s" in out
    assert "restarting in 0.2 s" in out  # the second crash waits longer


def test_stop_kills_a_service_that_ignores_sigterm_and_its_children(tmp_path: Path) -> None:
    stubborn = (
        "import signal, subprocess, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen(['sleep', '300'])\n"
        "print('up' + 'now', flush=True)\n"
        "time.sleep(300)\n"
    )
    stack = _stack(tmp_path, grace=0.5)
    child = Child("gateway", "gateway", [sys.executable, "-c", stubborn], tmp_path / "g.log")
    stack.children = [child]
    child.start(stack.env)
    while "upnow" not in (tmp_path / "g.log").read_text():
        time.sleep(0.05)
    family = [psutil.Process(child.pid), *psutil.Process(child.pid).children(recursive=True)]
    assert len(family) == 2
    stack.stop()
    assert not any(_alive(p) for p in family)
    assert not stack.shm.exists()


def test_up_tells_models_add_the_models_dir_it_serves_until_it_stops(tmp_path: Path, monkeypatch) -> None:  # fmt: skip
    """Even with servers given by the environment (no password or observer user to write), the
    connection file names the models directory, so ``aegaeon models add`` adds where the stack
    looks; it goes with the stack."""
    from aegaeon.model_store.cli import default_models_dir

    monkeypatch.setenv("AEGAEON_NATS_URL", "nats://127.0.0.1:4222")
    monkeypatch.setenv("AEGAEON_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("AEGAEON_HOME", str(tmp_path))
    stack = _stack(tmp_path)
    served = tmp_path / "served"
    stack.start_servers(served)
    connection = tmp_path / "connection.json"
    written = json.loads(connection.read_text())
    assert written == {"AEGAEON_MODELS_DIR": str(served), "AEGAEON_STACK_PID": str(os.getpid())}
    assert stat.S_IMODE(connection.stat().st_mode) == 0o600
    assert default_models_dir() == served
    stack.stop()
    assert not connection.exists() and default_models_dir() == tmp_path / "models"


def test_a_connection_file_left_by_a_killed_up_names_no_stack(tmp_path: Path, monkeypatch) -> None:  # fmt: skip
    """``kill -9`` of ``aegaeon up`` (or a reboot) leaves its connection file: tools must not
    take its models directory or servers for a running stack's."""
    from aegaeon.model_store.cli import default_models_dir

    from aegaeon.config import local_bus_config

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    monkeypatch.setenv("AEGAEON_HOME", str(tmp_path))
    left = {"AEGAEON_MODELS_DIR": str(tmp_path / "gone"), "AEGAEON_NATS_URL": "nats://127.0.0.1:1",
            "AEGAEON_STACK_PID": str(dead.pid)}  # fmt: skip
    (tmp_path / "connection.json").write_text(json.dumps(left))
    assert default_models_dir() == tmp_path / "models" and local_bus_config() is None


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_first_run_without_a_models_dir_writes_the_demo_models(tmp_path: Path) -> None:
    stack = _stack(tmp_path, models_dir=None)
    models_dir = stack.resolve_models_dir()
    assert models_dir == tmp_path / "models"
    assert len(list(models_dir.glob("*/config.json"))) >= 3
    stamp = {p: p.stat().st_mtime_ns for p in models_dir.glob("*/config.json")}
    assert stack.resolve_models_dir() == models_dir  # a second run keeps them
    assert {p: p.stat().st_mtime_ns for p in models_dir.glob("*/config.json")} == stamp


def test_stale_shared_memory_of_a_killed_launcher_is_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"aegaeon-up-{dead.pid}"
    live = tmp_path / f"aegaeon-up-{os.getpid()}"
    for folder in (stale, live):
        (folder / "aegaeon-local").mkdir(parents=True)
    assert remove_stale_shm(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


def test_a_stale_folder_with_an_impossible_pid_is_removed_not_a_crash(tmp_path: Path) -> None:
    stale = tmp_path / f"aegaeon-up-{10**30}"
    stale.mkdir()
    assert remove_stale_shm(tmp_path) == [stale]


def test_the_stack_folder_is_private_and_a_planted_one_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "aegaeon-up-1"
    make_private_dir(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    (folder / "left-over").write_text("x")
    make_private_dir(folder)  # ours: emptied and reused
    assert list(folder.iterdir()) == []
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    planted = tmp_path / "aegaeon-up-2"
    planted.symlink_to(elsewhere)  # what another local user could leave in /dev/shm
    with pytest.raises(RuntimeError, match="not this user's"):
        make_private_dir(planted)


def test_up_refuses_a_port_that_is_taken(capsys) -> None:
    from aegaeon.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["up", "--port", str(port)]) == 1
    assert f"port {port} is in use" in capsys.readouterr().err


# ---------------------------------------------------------------- the real thing


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_up_serves_every_model_and_stops_cleanly_on_sigterm(demo_models_dir: Path, tmp_path: Path) -> None:  # fmt: skip
    port = free_port()
    shm = Path("/dev/shm" if Path("/dev/shm").is_dir() else tmp_path) / f"aegaeon-test-{uuid.uuid4().hex[:8]}"  # fmt: skip
    shm.mkdir()
    env = {
        k: v for k, v in os.environ.items() if k not in ("AEGAEON_NATS_URL", "AEGAEON_REDIS_URL")
    }
    env |= {"AEGAEON_SHM_DIR": str(shm), "AEGAEON_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "aegaeon.cli", "up", "--models-dir", str(demo_models_dir),
               "--port", str(port), "--workers", "1", "--arena-bytes", str(512 * 1024**2)]  # fmt: skip
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while _get(f"http://127.0.0.1:{port}/health")[0] != 200:
            assert launcher.poll() is None, launcher.stdout.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no /health 200 within 300 s"
            time.sleep(0.5)
        status, body = _get(f"http://127.0.0.1:{port}/v1/models")
        assert status == 200
        listed = {m["id"] for m in json.loads(body)["data"]}
        assert listed == {p.parent.name for p in demo_models_dir.glob("*/config.json")}
        family = psutil.Process(launcher.pid).children(recursive=True)
        assert len(family) >= 6  # nats, redis, model-store, scheduler, worker, gateway
        launcher.send_signal(signal.SIGTERM)
        output = launcher.communicate(timeout=120)[0].decode()
        assert launcher.returncode == 0, output
        assert "aegaeon up: stopped" in output
        assert [p.pid for p in family if _alive(p)] == []
        assert list(shm.iterdir()) == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
        shm.rmdir() if shm.exists() and not any(shm.iterdir()) else None


def test_up_passes_slos_and_policy_options_to_the_scheduler(tmp_path):
    import argparse

    from aegaeon.stack_plan import add_arguments, plan_children

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--slo-ttft", "2.5", "--slo-tbt", "0.05", "--policy-option", "quota_s=1"]
    )
    children = plan_children(args, tmp_path, tmp_path, cache_bytes=1 << 20)
    scheduler = next(c for c in children if c.kind == "scheduler").argv
    joined = " ".join(scheduler)
    assert "--slo-ttft 2.5" in joined and "--slo-tbt 0.05" in joined
    assert "--policy-option quota_s=1" in joined


def test_up_with_two_schedulers_starts_both_under_their_own_ids_and_logs(
    tmp_path,
):
    import argparse

    from aegaeon.stack_plan import add_arguments, plan_children

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    one = plan_children(parser.parse_args([]), tmp_path, tmp_path, cache_bytes=1 << 20)
    assert [c.name for c in one if c.kind == "scheduler"] == ["scheduler"]
    args = parser.parse_args(["--schedulers", "2", "--policy", "round-robin"])
    schedulers = [c for c in plan_children(args, tmp_path, tmp_path, cache_bytes=1 << 20)
                  if c.kind == "scheduler"]  # fmt: skip
    assert [c.name for c in schedulers] == ["scheduler-0", "scheduler-1"]
    assert [c.log_path.name for c in schedulers] == ["scheduler-0.log", "scheduler-1.log"]
    for child in schedulers:
        joined = " ".join(child.argv)
        assert f"--scheduler-id {child.name}" in joined and "--policy round-robin" in joined


def test_up_refuses_zero_schedulers(capsys) -> None:
    from aegaeon.cli import main

    assert main(["up", "--schedulers", "0"]) == 2
    assert "--schedulers must be at least 1" in capsys.readouterr().err


def test_a_port_whose_last_connections_linger_in_time_wait_counts_as_free() -> None:
    # A stack stopped a moment ago leaves its gateway's connections in TIME_WAIT; `aegaeon up`
    # started again must not refuse the port (uvicorn binds with address reuse too).
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end of the connection enters TIME_WAIT
    client.recv(1)
    client.close()
    listener.close()
    assert _port_free("127.0.0.1", port)


def test_a_port_someone_listens_on_is_not_free() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        assert not _port_free("127.0.0.1", listener.getsockname()[1])


@pytest.mark.parametrize("bad", ["node.1", "w*", "a b", "w>", ""])
def test_worker_and_gateway_ids_that_would_break_subjects_are_refused(bad: str) -> None:
    from aegaeon.gateway.main import add_arguments as gateway_arguments
    from aegaeon.gpu_worker.main import add_arguments as worker_arguments

    for add, option in ((worker_arguments, "--worker-id"), (gateway_arguments, "--gateway-id")):
        parser = argparse.ArgumentParser(exit_on_error=False)
        add(parser)
        with pytest.raises(argparse.ArgumentError):
            parser.parse_args([option, bad])


def test_the_default_worker_id_is_one_subject_token_even_on_a_dotted_hostname() -> None:
    from aegaeon.subjects import host_token, subject_token

    assert subject_token(host_token("node1.example.com") + "-42") == "node1-example-com-42"
