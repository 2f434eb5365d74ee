"""Start the real service for tests: ``llamavid serve|api|worker`` as subprocesses on free ports.

Tests talk to it the way users do (HTTP, the openai client, a browser); nothing is imported
into the test process, so a crash, a hang or a leaked thread shows up as it would in production.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    proc: subprocess.Popen
    log: Path
    url: str | None = None
    env: dict = field(default_factory=dict)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def spawn(command: str, env: dict[str, str], log: Path, port: int | None = None,
          prefix: Sequence[str] = ()) -> Process:
    """``llamavid <command>`` in the background; ``prefix`` runs it under another command (``taskset``)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    if port is not None:
        full_env["LLAMAVID_PORT"] = str(port)
        full_env["LLAMAVID_HOST"] = "127.0.0.1"
    handle = open(log, "wb")
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "server.cli", command, "--log-level", "info"],
        cwd=REPO, env=full_env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
    )
    return Process(proc, log, f"http://127.0.0.1:{port}" if port else None, full_env)


def wait_ready(process: Process, timeout: float = 120.0, path: str = "/ready") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise RuntimeError(f"server exited with {process.proc.returncode}:\n{process.output()[-4000:]}")
        try:
            if httpx.get(process.url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout}s:\n{process.output()[-4000:]}")


def start_server(tmp: Path, model_dir: Path | str, **settings: object) -> Process:
    """``llamavid serve`` on a free port with LLAMAVID_* settings; returns once /ready is 200."""
    env = {"LLAMAVID_MODEL": str(model_dir), "LLAMAVID_DEVICE": "cpu",
           "LLAMAVID_ALLOWED_MEDIA_HOSTS": "127.0.0.1", "LLAMAVID_MEDIA_DIR": str(tmp / "media")}
    env.update({f"LLAMAVID_{k.upper()}": str(v) for k, v in settings.items()})
    process = spawn("serve", env, tmp / f"serve-{time.monotonic_ns()}.log", free_port())
    try:
        wait_ready(process)
    except BaseException:
        process.kill()
        raise
    return process
