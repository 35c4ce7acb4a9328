"""Real servers for the suite and the benchmarks, started in a fresh temporary directory and
stopped after: Redis and PostgreSQL from Debian's packages (`.ci/run` installs them)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_bin() -> Path | None:
    """Debian keeps initdb and pg_ctl out of PATH, under /usr/lib/postgresql/<version>/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


class PostgresServer:
    """A throwaway PostgreSQL: `initdb` and `pg_ctl` in a fresh directory, on a free loopback port,
    with fsync off (a test's data need not survive a power cut). PostgreSQL refuses to run as
    root, so as root the directory is the `postgres` user's and the commands run as that user."""

    def __init__(self, binaries: Path, max_connections: int = 100) -> None:
        self.bin = binaries
        self.root = Path(tempfile.mkdtemp(prefix="tollgate-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.max_connections = max_connections
        self.dsn = f"postgresql://tollgate@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o700)

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=120)

    def start(self) -> None:
        if not self.data.exists():
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "tollgate", "-A", "trust",
                      "-E", "UTF8", "--locale=C", "--no-sync")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   f"-c synchronous_commit=off -c full_page_writes=off -c max_connections={self.max_connections}")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        """Stops it, keeping its data (start() brings it back as it was)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """A real redis-server on a unix socket (no TCP port to race for), with no persistence:
    stopped and started again, it comes back empty, as a restarted cache does."""

    def __init__(self, where: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.binary, self.where = binary, where
        self.sock = where / "redis.sock"
        self.url = f"unix://{self.sock}"
        self.proc: Any = None

    def start(self) -> None:
        """Ready when it says so."""
        self.proc = proc = subprocess.Popen(
            [self.binary, "--port", "0", "--unixsocket", str(self.sock), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.where)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded: the server ends the stream if it exits
            if "ready to accept connections" in line.lower():
                break
        else:
            raise RuntimeError("redis-server exited before it was ready")
        # Its later log lines are read off, so a full pipe never blocks it.
        threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc.stdout.close()
            self.proc = None


def self_signed_certificate(directory: Path, stem: str) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1 that `openssl` makes: `<stem>-cert.pem`, `<stem>-key.pem`."""
    cert, key = directory / f"{stem}-cert.pem", directory / f"{stem}-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
                    "-out", str(cert), "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


class MailServer:
    """A real SMTP server (aiosmtpd) on a loopback port of the test's own event loop: plain,
    STARTTLS or TLS from the start, with a certificate `openssl` makes for 127.0.0.1. It keeps
    the messages it takes, or refuses every one (`refuse`) with 550."""

    def __init__(self, directory: Path, security: str = "none", refuse: bool = False,
                 login: tuple[str, str] | None = None) -> None:
        import asyncio

        self.login = login          # when set, a login over TLS is required, and only this one works
        self.logins: list[str] = []
        self.security = security
        self.refuse = refuse
        self.messages: list[Any] = []
        self.arrived = asyncio.Event()
        self.cert, self.key = directory / "smtp-cert.pem", directory / "smtp-key.pem"
        self.port = 0
        self._server: Any = None
        if security != "none":
            self.cert, self.key = self_signed_certificate(directory, "smtp")

    async def start(self) -> None:
        import asyncio
        import email
        import ssl

        from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

        outer = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                if outer.refuse:
                    return "550 5.7.1 Refused by policy"
                outer.messages.append(email.message_from_bytes(envelope.content))
                outer.arrived.set()
                return "250 OK"

        def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
            ok = isinstance(data, LoginPassword) and (data.login.decode(), data.password.decode()) == outer.login
            if ok:
                outer.logins.append(data.login.decode())
            return AuthResult(success=ok)

        context = None
        if self.security != "none":
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.cert, self.key)
        starttls = self.security == "starttls"
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(Handler(), tls_context=context if starttls else None, require_starttls=starttls,
                         hostname="127.0.0.1", auth_required=self.login is not None,
                         authenticator=authenticate if self.login is not None else None),
            "127.0.0.1", 0, ssl=context if self.security == "tls" else None)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
