"""One writer per output folder: a lock file holding the PID and host of the run that writes there.

Two training runs on one `--output_dir` would interleave their checkpoints, logs and pipeline files. [`OutputDirLock`]
creates `<output_dir>/.train_vrfm.lock` (atomically, with its content complete) when a run starts and removes it when
the run ends. A second run finds the lock and fails at once, naming the holder. A lock left by a process that no
longer runs (killed, or a crashed machine restarted) on this host is taken over, and the run says so. The lock also
records the host's boot and the process's start time where Linux tells them, so that a PID reused by another process
(after a restart, say) does not pass for the holder. A lock from another host cannot be checked: the message says how
to remove it once that run is known to be gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

LOCK_FILE_NAME = ".train_vrfm.lock"

logger = logging.getLogger(__name__)


class OutputDirLockedError(RuntimeError):
    """Another run holds the lock of the output folder."""


def process_is_running(pid: int) -> bool:
    """Whether a process with this PID runs on this host (signal 0 checks without sending anything); a zombie (dead,
    not yet reaped by its parent) does not count."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        return True
    except OSError:
        return False
    fields = _stat_fields(pid)
    return not fields or fields[0] != "Z"  # without /proc (not Linux) signal 0 is all we can check


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of Linux's `/proc/<pid>/stat` after the process name (so from field 3, the state, on), or `None`
    where they cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (field 22 of Linux's `/proc/<pid>/stat`), or `None`
    where it cannot be read. A PID reused by a later process has a later start."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19])  # field 22: the list starts at field 3
    except (TypeError, IndexError, ValueError):
        return None


def boot_id() -> str | None:
    """The identifier of this boot of the host (Linux), or `None`: PIDs from before a restart name other processes."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def holder_is_running(holder: dict) -> bool:
    """Whether the run that wrote the lock record `holder` (on this host) still runs: its PID is alive, and, where the
    record and the host both tell, in the same boot and with the same start time."""
    pid = holder["pid"]
    if not process_is_running(pid):
        return False
    recorded_boot, recorded_start = holder.get("boot_id"), holder.get("start_ticks")
    if recorded_boot is not None and boot_id() not in (None, recorded_boot):
        return False
    started = process_start_ticks(pid)
    return recorded_start is None or started is None or started == recorded_start


def is_global_main_process() -> bool:
    """Whether this process is the global main process of a (possibly multi-process) launch, read from the
    environment that `accelerate launch` / `torchrun` (RANK) or MPI set, before any process group exists."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK"], 0) == 0


class OutputDirLock:
    """The lock of a training output folder; a context manager (`with OutputDirLock(folder): ...`).

    Args:
        output_dir (`str`): the folder (created if needed).
        enabled (`bool`, defaults to `True`): `False` makes it a no-op, for the non-main processes of a multi-process
            run (only the main process writes the folder, so only it takes the lock).
        log (`Callable[[str], None]`, *optional*): where the takeover of a stale lock is announced (a warning).

    Example:

    ```py
    >>> import tempfile
    >>> from diffusers_vrfm.training.lock import OutputDirLock, OutputDirLockedError
    >>> folder = tempfile.mkdtemp()
    >>> with OutputDirLock(folder):
    ...     try:
    ...         OutputDirLock(folder).acquire()
    ...     except OutputDirLockedError:
    ...         print("refused")
    refused
    ```
    """

    def __init__(self, output_dir: str, enabled: bool = True, log=None):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE_NAME)
        self.enabled = enabled
        self.log = log or logger.warning
        self.record = None

    def acquire(self) -> OutputDirLock:
        """Takes the lock, taking over a stale one; raises [`OutputDirLockedError`] when a live run holds it."""
        if not self.enabled:
            return self
        os.makedirs(self.output_dir, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        record.update(boot_id=boot_id(), start_ticks=process_start_ticks(os.getpid()))
        for _ in range(3):  # a takeover races at most with other runs taking over the same stale lock
            if self._create(record):
                self.record = record
                return self
            holder = self._read()
            if holder is None:
                continue  # removed between our attempt and the read
            self._refuse_unless_stale(holder)
            self._take_over(holder)
        raise OutputDirLockedError(f"Could not take the lock {self.path}: other runs keep taking it.")

    def release(self) -> None:
        """Removes the lock file if it is still ours."""
        if self.record is not None and self._read() == self.record:
            os.remove(self.path)
        self.record = None

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    # ------------------------------------------------------------------------------------------------- internals
    def _create(self, record: dict) -> bool:
        """Creates the lock with its full content in one step (a hard link of a complete file); False if it exists."""
        temporary = f"{self.path}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, self.path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive creation, then the content
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(record, handle)
        finally:
            os.remove(temporary)
        return True

    def _read(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
            raise OutputDirLockedError(
                f"{self.path} exists but is not a lock this script wrote ({text[:80]!r}). If no run writes to "
                f"{self.output_dir!r}, delete that file and start again."
            )
        return record

    def _refuse_unless_stale(self, holder: dict) -> None:
        same_host = holder.get("host") == socket.gethostname()
        if same_host and not holder_is_running(holder):
            return
        where = "this host" if same_host else f"host {holder.get('host')!r}"
        advice = (
            "Wait for it to finish, stop it, or pass another --output_dir."
            if same_host
            else f"It cannot be checked from here: if that run is gone, delete {self.path} and start again."
        )
        raise OutputDirLockedError(
            f"Another training run (pid {holder['pid']} on {where}, started {holder.get('started')}) is writing to "
            f"{self.output_dir!r}: two runs in one output folder would mix their checkpoints and logs. {advice}"
        )

    def _take_over(self, holder: dict) -> None:
        """Moves the stale lock aside (only one of several racing runs succeeds) and announces the takeover."""
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another run moved it first; our next attempt races for the new lock
        try:
            with open(aside, encoding="utf-8") as handle:
                moved = json.load(handle)
        except (OSError, json.JSONDecodeError):
            moved = None
        if moved != holder:  # another run took it over in between: give its fresh lock back
            try:
                os.link(aside, self.path)
            finally:
                os.remove(aside)
            return
        os.remove(aside)
        self.log(
            f"Taking over the stale lock {self.path}: its run (pid {holder['pid']} on this host, started "
            f"{holder.get('started')}) is no longer running."
        )
