"""A host KV pool left by a killed worker (its close() never ran) is removed by the next pool
made in the same folder; a live process' pool never is. Real processes, killed with SIGKILL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from aegaeon.gpu_worker.host_kv import HostKVPool

MAKE_POOL = """
import sys
from pathlib import Path
from aegaeon.gpu_worker.host_kv import HostKVPool
pool = HostKVPool(1 << 20, Path(sys.argv[1]))
print(pool.path, flush=True)
sys.stdin.read()  # alive until killed
"""


def pool_of_another_process(folder: Path) -> tuple[subprocess.Popen, Path]:
    process = subprocess.Popen([sys.executable, "-c", MAKE_POOL, str(folder)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def test_a_killed_process_pool_is_removed_and_a_live_one_is_kept(tmp_path):
    process, path = pool_of_another_process(tmp_path)
    try:
        assert path.exists()
        mine = HostKVPool(1 << 20, tmp_path)
        assert path.exists()  # its process is alive: kept
    finally:
        process.kill()
        process.wait()
    assert path.exists()  # a SIGKILL runs no clean-up
    again = HostKVPool(1 << 20, tmp_path)
    assert not path.exists()
    assert mine.path.exists() and again.path.exists()  # this process' pools are alive
    mine.close()
    again.close()
    assert list(tmp_path.iterdir()) == []
