"""Start a wesam server as a child process and wait until it is ready (benchmarks, tests, scripts).

The server runs in its own process group, so ``stop()`` ends BentoML's arbiter and every worker
it spawned, also when the caller fails half-way (use it as a context manager).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .cli import serve_command
from .config import ServeConfig


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, config: ServeConfig, *, host: str = "127.0.0.1", port: int | None = None,
                 bentoml_home: str | os.PathLike | None = None, log_path: str | os.PathLike | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.config = config
        self.host = host
        self.port = port or free_port(host)
        # Its own BENTOML_HOME: BentoML wipes $BENTOML_HOME/prometheus_multiproc_dir at startup, which
        # would clobber the metrics of any other server sharing the default home.
        self._tmp = tempfile.TemporaryDirectory(prefix="wesam-serve-") if bentoml_home is None else None
        self.bentoml_home = Path(bentoml_home or self._tmp.name)
        self.log_path = Path(log_path) if log_path else self.bentoml_home / "server.log"
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def grpc_url(self) -> str | None:
        return f"{self.config.grpc_host}:{self.config.grpc_port}" if self.config.grpc_port else None

    def start(self, timeout: float = 300.0) -> "ServerProcess":
        cmd, env = serve_command(self.config, self.host, self.port)
        env.update({"BENTOML_HOME": str(self.bentoml_home), **self.extra_env})
        self.bentoml_home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with code {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    with urllib.request.urlopen(self.url + "/readyz", timeout=5) as r:
                        if r.status == 200:
                            return self
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.5)
            raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:  # workers left behind by a crashed arbiter are in the same group
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "ServerProcess":
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
