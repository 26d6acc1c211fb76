"""Who is writing a result store: one writer at a time, and a writer that died gives way.

Two sweeps on one store would measure the same configs twice and keep only the first row of
each. A store therefore holds a lease (one row: owner pid, host, start and last heartbeat),
taken in a write transaction before any work and refreshed with every row. A second writer is
refused while the owner lives; an owner that died (its pid is gone on this host, or its
heartbeat is older than ``EXPIRE_S`` on another host) has lost the lease and is replaced.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from dataclasses import dataclass

EXPIRE_S = 600.0  # a writer on another host that has not written for this long is taken to be dead


@dataclass(frozen=True)
class Owner:
    pid: int
    host: str
    started: float
    heartbeat: float

    def alive(self, now: float) -> bool:
        if self.host != socket.gethostname():
            return now - self.heartbeat < EXPIRE_S
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
        return True

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}, since {when}"


def _me() -> tuple[int, str]:
    return os.getpid(), socket.gethostname()


def _ensure(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS lease (id INTEGER PRIMARY KEY CHECK (id = 1), pid INTEGER NOT NULL, "
                 "host TEXT NOT NULL, started REAL NOT NULL, heartbeat REAL NOT NULL)")


def acquire(conn: sqlite3.Connection) -> Owner | None:
    """Take the lease for this process; returns the live owner that holds it instead (None: taken)."""
    pid, host = _me()
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")  # one writer decides at a time
    try:
        _ensure(conn)
        row = conn.execute("SELECT pid, host, started, heartbeat FROM lease WHERE id = 1").fetchone()
        if row is not None:
            owner = Owner(*row)
            if (owner.pid, owner.host) != (pid, host) and owner.alive(now):
                conn.execute("ROLLBACK")
                return owner
        conn.execute("INSERT OR REPLACE INTO lease VALUES (1, ?, ?, ?, ?)", (pid, host, now, now))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return None


def heartbeat(conn: sqlite3.Connection) -> None:
    """Refresh this process's lease (inside the caller's transaction)."""
    pid, host = _me()
    conn.execute("UPDATE lease SET heartbeat = ? WHERE id = 1 AND pid = ? AND host = ?", (time.time(), pid, host))


def release(conn: sqlite3.Connection) -> None:
    """Give the lease back, if this process holds it."""
    pid, host = _me()
    with conn:
        conn.execute("DELETE FROM lease WHERE id = 1 AND pid = ? AND host = ?", (pid, host))
