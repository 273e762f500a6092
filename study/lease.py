"""One live driver per study: taking the lease, keeping it alive, and judging whether a driver is.

The database records who drives a study (`rbm_drivers`: host, pid, start, heartbeat, token). A
driver renews its heartbeat every HEARTBEAT_S seconds from a thread of its own. Another process
counts it alive while

    the token is set (not released)  and  the heartbeat is at most TIMEOUT_S old
    and, when it runs on this host, its pid is a running process.

So a driver killed on this machine is seen dead at once, one on another host after TIMEOUT_S (the
only sign left there is silence). TIMEOUT_S is six heartbeats: a driver whose heartbeat thread is
held up by a slow write (SQLite waits up to its busy timeout) or a short stall of the machine is not
taken over, while a dead one on another host is taken over within half a minute. On PostgreSQL the
lease's times come from the server's clock (`StudyStorage._clock`), so drivers and readers on
machines whose clocks disagree still agree on a heartbeat's age.

Taking the lease is a compare-and-swap on the token the taker saw (`StudyStorage.take_driver`), so
of two `resume`s started at the same instant exactly one wins; the other re-reads the record, finds
a live driver and is refused. With an SQLite file, heartbeat times are UTC from each host's clock:
hosts that share the file are assumed to agree to well within TIMEOUT_S.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from datetime import datetime
from pathlib import Path

from rbm_study.core.errors import UserError
from rbm_study.study.storage import DriverClaim, DriverInfo, StudyStorage, now

HEARTBEAT_S = 5.0
TIMEOUT_S = 30.0


class DriverAliveError(UserError):
    """A study already has a live driver; nothing was written."""


def this_driver() -> DriverClaim:
    return DriverClaim(host=socket.gethostname(), pid=os.getpid(), token=uuid.uuid4().hex)


def pid_running(pid: int) -> bool:
    """Whether `pid` is a running process on this host (a zombie, killed but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but running
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): the signal check is all there is


def heartbeat_age(driver: DriverInfo, at: datetime | None = None) -> float:
    """Seconds since the heartbeat, by the clock that wrote it (the database's, when it was read)."""
    return max(0.0, ((at or driver.seen_at or now()) - driver.heartbeat_at).total_seconds())


def is_alive(driver: DriverInfo | None, at: datetime | None = None) -> bool:
    if driver is None or driver.token is None or heartbeat_age(driver, at) > TIMEOUT_S:
        return False
    return pid_running(driver.pid) if driver.host == socket.gethostname() else True


def describe(driver: DriverInfo | None, study_status: str) -> str:
    """One line for `status`: 'driver alive on HOST (pid N, heartbeat 3 s ago)' or 'no driver since ...'."""
    if driver is not None and is_alive(driver):
        return f"driver alive on {driver.host} (pid {driver.pid}, heartbeat {heartbeat_age(driver):.0f} s ago)"
    if driver is None:
        since = "this database recorded drivers (schema version 1)"
    else:
        since = f"{driver.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC (last: {driver.host}, pid {driver.pid})"
    advice = "" if study_status == "completed" else ": run resume"
    return f"no driver since {since}{advice}"


class Lease:
    """This process's lease on one study, renewed by a daemon thread until `release`.

    `lost` is set when a renewal finds the lease taken by another driver (this one was silent past
    TIMEOUT_S, e.g. a suspended laptop): the driver must then stop without writing the study."""

    def __init__(self, storage: StudyStorage, study_id: int, claim: DriverClaim):
        self.storage, self.study_id, self.claim = storage, study_id, claim
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="rbm-study-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self.storage.renew_driver(self.study_id, self.claim.token):
                    self.lost.set()
                    return
            except Exception as err:  # a busy or briefly unreachable database: try again next beat
                print(f"rbm-study: heartbeat not written ({str(err).splitlines()[0]})", flush=True)

    def release(self) -> None:
        """Stop the heartbeat and hand the study back (a clean stop: Ctrl-C, SIGTERM, the end)."""
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S * 2)
        if not self.lost.is_set():
            self.storage.release_driver(self.study_id, self.claim.token)


def acquire(storage: StudyStorage, study_id: int, study_name: str) -> tuple[Lease, DriverInfo | None]:
    """Take the study's lease or raise DriverAliveError (nothing written). Returns the lease and
    the dead driver it took over from, if any."""
    claim = this_driver()
    for _ in range(3):
        current = storage.driver(study_id)
        if is_alive(current):
            assert current is not None
            raise DriverAliveError(
                f"study {study_name!r} already has a live driver on {current.host} (pid {current.pid}, "
                f"heartbeat {heartbeat_age(current):.0f} s ago); wait for it, or stop it (Ctrl-C, or kill "
                f"{current.pid} on {current.host}) and run resume again"
            )
        if storage.take_driver(study_id, claim, current):
            return Lease(storage, study_id, claim), current if current and current.token else None
    raise DriverAliveError(f"study {study_name!r}: another driver took it at the same moment; run status")


def adopt(storage: StudyStorage, study_id: int, claim: DriverClaim) -> Lease:
    """The lease `create_study` took for a new study."""
    return Lease(storage, study_id, claim)
