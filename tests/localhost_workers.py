"""Shared launcher for the multi-process tests: N local CPU processes joined through
`jaxstack.parallel.initialize()` (JAXSTACK_* variables), one CPU device each unless
`extra_env` sets XLA_FLAGS."""

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(
    args: list[str], *, n: int = 2, extra_env: dict | None = None, drop_env: tuple = ()
) -> list[subprocess.Popen]:
    """Start `python ARGS...` n times as processes 0..n-1 of one job (stdout+stderr merged)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and k not in drop_env}
    env.update(
        JAX_PLATFORMS="cpu",
        JAXSTACK_COORDINATOR=f"127.0.0.1:{free_port()}",
        JAXSTACK_NUM_PROCESSES=str(n),
        **(extra_env or {}),
    )
    return [
        subprocess.Popen(
            [sys.executable, *args],
            env={**env, "JAXSTACK_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]


def wait_workers(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each worker's output; fails naming the worker that exited non-zero. Kills stragglers."""
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"worker {i} failed (rc {p.returncode}):\n{logs[i][-3000:]}"
    return logs
