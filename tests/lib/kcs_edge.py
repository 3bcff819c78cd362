"""Test harness for Python tests: a real `kcs dev` edge on free ports, tokens from `kcs token`.

With KCS_MOCK_EDGE=1 it starts tests/lib/mock_edge.py instead (aiortc stand-in, for checking the
tests' own plumbing while the edge is being written; it proves nothing about the edge).

The binary is $KCS_BIN (scripts/test.sh sets it to the one it built), else the newer of
<target>/debug/kcs and <target>/release/kcs, <target> being $CARGO_TARGET_DIR or <repo>/target.
Use it as a context manager so the edge is always stopped, also when
the test fails; its output goes to artifacts/<name>-edge.log.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"

# The edge answers /healthz well under a second after start; 15 s only catches a hang.
READY_TIMEOUT_S = 15.0


def kcs_bin() -> Path:
    if os.environ.get("KCS_BIN"):
        return Path(os.environ["KCS_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    built = [p for p in (target / "debug" / "kcs", target / "release" / "kcs") if p.exists()]
    return max(built, key=lambda p: p.stat().st_mtime) if built else target / "debug" / "kcs"


def free_port(kind: int, host: str = "127.0.0.1") -> int:
    """A port free right now (the OS picks it) for SOCK_STREAM or SOCK_DGRAM."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Edge:
    """A `kcs dev` process: `url`, `http_port`, `udp_port`, `token()`, `tail()`, `stop()`."""

    def __init__(self, name: str, http_host: str = "127.0.0.1", udp_host: str = "0.0.0.0"):
        self.name = name
        self.http_host = http_host
        self.udp_host = udp_host
        self.bin = kcs_bin()
        self.proc: subprocess.Popen | None = None
        self.data_dir = ""
        self.http_port = 0
        self.udp_port = 0
        self.log_path = ARTIFACTS / f"{name}-edge.log"

    @property
    def url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}"

    mock = os.environ.get("KCS_MOCK_EDGE") == "1"

    def start(self) -> "Edge":
        if not self.mock and not self.bin.exists():
            raise RuntimeError(
                f"{self.bin} not found: build it with cargo build -p edge-node --bin kcs"
            )
        ARTIFACTS.mkdir(exist_ok=True)
        self.data_dir = tempfile.mkdtemp(prefix=f"kcs-{self.name}-")
        self.http_port = free_port(socket.SOCK_STREAM, self.http_host)
        udp_probe = "127.0.0.1" if self.udp_host == "0.0.0.0" else self.udp_host
        self.udp_port = free_port(socket.SOCK_DGRAM, udp_probe)
        log = open(self.log_path, "wb")
        env = {"RUST_LOG": "info", **os.environ}
        cmd = [
            str(self.bin), "dev",
            "--http", f"{self.http_host}:{self.http_port}",
            "--udp", f"{self.udp_host}:{self.udp_port}",
            "--data-dir", self.data_dir,
        ]
        if self.mock:
            cmd = [sys.executable, str(REPO / "tests" / "lib" / "mock_edge.py"),
                   "--http", f"{self.http_host}:{self.http_port}"]
        self.proc = subprocess.Popen(
            cmd,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                tail = self.tail()
                self.stop()
                raise RuntimeError(f"kcs exited early with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as res:
                    if res.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.url}/healthz not 200 within {READY_TIMEOUT_S} s")
            time.sleep(0.1)

    def token(self, room: str, identity: str, role: str = "host") -> str:
        if self.mock:
            return f"mock:{room}:{identity}"
        out = subprocess.run(
            [str(self.bin), "token", "--room", room, "--identity", identity, "--role", role,
             "--data-dir", self.data_dir],
            check=True, capture_output=True, text=True,
        )
        return out.stdout.strip()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "Edge":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
