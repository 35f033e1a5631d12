"""A throwaway PostgreSQL cluster for tests: `initdb` into a temp dir, `pg_ctl`
start on a free loopback port, one database, trust authentication, and
everything removed on stop.

    with PostgresCluster.start() as pg:
        url = pg.asyncpg_url("prefect")   # postgresql+asyncpg://postgres@127.0.0.1:PORT/prefect

PostgreSQL refuses to run as root, so as root the binaries run as an
unprivileged system user (`postgres` if it exists, else `nobody`) through
`runuser`, and the data directory is created outside any root-only temp dir.
Binaries are looked up on PATH, then in Debian's /usr/lib/postgresql/<ver>/bin
(`tests/support/install_postgres.sh` installs them). `PostgresUnavailable`
says why a cluster cannot be had, for a skip reason.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dispatcher.embedded_server import free_port

__all__ = ["PostgresCluster", "PostgresUnavailable", "find_bin_dir"]

SUPERUSER = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries, or no way to run them here."""


def find_bin_dir() -> Optional[Path]:
    """The directory holding `initdb` and `pg_ctl`, or None."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(os.path.realpath(initdb)).parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    for candidate in reversed(versions):
        if (candidate.parent / "pg_ctl").exists():
            return candidate.parent
    return None


def _run_as() -> Optional[str]:
    """The user to run PostgreSQL as when we are root (None: as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and there is no 'postgres' or 'nobody' user to run PostgreSQL as")


@dataclass
class PostgresCluster:
    bin_dir: Path
    data_dir: Path
    port: int
    user: Optional[str] = None  # the OS user the server runs as (None: this process's)
    _root: Path = field(default=Path("."), repr=False)

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, *, timeout: float = 60) -> "PostgresCluster":
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise PostgresUnavailable(
                "PostgreSQL binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin; "
                "run tests/support/install_postgres.sh"
            )
        user = _run_as()
        root = Path(tempfile.mkdtemp(prefix="pushpool-pg-"))  # in /tmp itself: reachable by `user`
        data_dir = root / "data"
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        cluster = cls(bin_dir=bin_dir, data_dir=data_dir, port=free_port(), user=user, _root=root)
        try:
            cluster._pg(
                "initdb", "-D", str(data_dir), "--username", SUPERUSER, "--auth", "trust",
                "--encoding", "UTF8", "--no-sync", "--locale", "C",
            )
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={cluster.port} -c unix_socket_directories={root} "
                "-c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            cluster._pg(
                "pg_ctl", "-D", str(data_dir), "-l", str(root / "server.log"), "-o", options,
                "-w", "-t", str(int(timeout)), "start",
            )
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            try:
                self._pg("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop", check=False)
            except Exception:  # noqa: BLE001 - removing the files below is what matters
                pass
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> "PostgresCluster":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ use

    def create_database(self, name: str) -> str:
        """Create database `name`; return its asyncpg URL."""
        self._pg("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name)
        return self.asyncpg_url(name)

    def asyncpg_url(self, database: str) -> str:
        return f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def log(self) -> str:
        try:
            return (self._root / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def _pg(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / program), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=str(self._root))
        if check and result.returncode != 0:
            raise PostgresUnavailable(
                f"{program} failed with code {result.returncode}: {result.stderr.strip() or result.stdout.strip()}"
                + (f"\n{self.log[-2000:]}" if program == "pg_ctl" else "")
            )
        return result
