"""`OutputDirLock`: one writer per output folder (issue 17), tested on the lock itself; the two-run attack through the
training script is in test_train_reliability.py."""

import json
import os
import socket
import subprocess
import sys

import pytest

from diffusers_vrfm.training.lock import (
    LOCK_FILE_NAME,
    OutputDirLock,
    OutputDirLockedError,
    boot_id,
    is_global_main_process,
    process_is_running,
    process_start_ticks,
)


def _write_lock(folder, **record):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK_FILE_NAME), "w") as handle:
        handle.write(record.pop("raw") if "raw" in record else json.dumps(record))


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_lock_holds_pid_and_host_and_is_released(tmp_path):
    folder = str(tmp_path / "out")
    with OutputDirLock(folder) as lock:
        with open(lock.path) as handle:
            record = json.load(handle)
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["started"]
        with pytest.raises(OutputDirLockedError, match=rf"pid {os.getpid()} on this host.*another --output_dir"):
            OutputDirLock(folder).acquire()
    assert os.listdir(folder) == [], "released, and no temporary file left"


def test_a_lock_is_released_when_the_body_raises(tmp_path):
    folder = str(tmp_path)
    with pytest.raises(KeyError):
        with OutputDirLock(folder):
            raise KeyError("boom")
    assert not os.path.exists(os.path.join(folder, LOCK_FILE_NAME))


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_announced(tmp_path):
    folder = str(tmp_path)
    pid = _dead_pid()
    assert not process_is_running(pid)
    _write_lock(folder, pid=pid, host=socket.gethostname(), started="yesterday")
    messages = []
    with OutputDirLock(folder, log=messages.append):
        with open(os.path.join(folder, LOCK_FILE_NAME)) as handle:
            assert json.load(handle)["pid"] == os.getpid()
    assert len(messages) == 1 and f"pid {pid} on this host, started yesterday) is no longer running" in messages[0]


@pytest.mark.skipif(process_start_ticks(os.getpid()) is None, reason="needs Linux's /proc")
def test_a_live_pid_that_another_process_reused_does_not_hold_the_lock(tmp_path):
    """The lock names a live PID (this process), but a start time or boot that is not this process's: the PID was
    reused, so the lock is stale; with both matching, it is a live holder."""
    folder, own = str(tmp_path), {"pid": os.getpid(), "host": socket.gethostname(), "started": "earlier"}
    start, boot = process_start_ticks(os.getpid()), boot_id()
    assert start > 0 and boot
    for stale in ({"start_ticks": start - 1, "boot_id": boot}, {"start_ticks": start, "boot_id": "another boot"}):
        _write_lock(folder, **own, **stale)
        messages = []
        with OutputDirLock(folder, log=messages.append) as lock:
            assert lock.record["start_ticks"] == start and lock.record["boot_id"] == boot
        assert len(messages) == 1 and "is no longer running" in messages[0]
    _write_lock(folder, **own, start_ticks=start, boot_id=boot)
    with pytest.raises(OutputDirLockedError, match=rf"pid {os.getpid()} on this host, started earlier"):
        OutputDirLock(folder).acquire()


def test_a_lock_from_another_host_is_refused_with_advice(tmp_path):
    folder = str(tmp_path)
    _write_lock(folder, pid=_dead_pid(), host="elsewhere", started="now")
    with pytest.raises(OutputDirLockedError, match=r"on host 'elsewhere'.*cannot be checked from here.*delete"):
        OutputDirLock(folder).acquire()
    assert os.path.exists(os.path.join(folder, LOCK_FILE_NAME)), "a lock we could not check is left alone"


def test_a_foreign_file_under_the_lock_name_is_refused(tmp_path):
    _write_lock(str(tmp_path), raw="not json")
    with pytest.raises(OutputDirLockedError, match="is not a lock this script wrote"):
        OutputDirLock(str(tmp_path)).acquire()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = OutputDirLock(str(tmp_path)).acquire()
    _write_lock(str(tmp_path), pid=12345678, host="elsewhere", started="later")  # someone replaced it
    lock.release()
    assert os.path.exists(lock.path)


def test_only_the_main_process_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert not is_global_main_process()
    with OutputDirLock(str(tmp_path), enabled=is_global_main_process()):
        assert not os.path.exists(os.path.join(str(tmp_path), LOCK_FILE_NAME))
    monkeypatch.setenv("RANK", "0")
    assert is_global_main_process()
    monkeypatch.delenv("RANK")
    assert is_global_main_process(), "a single-process run is the main process"


def test_the_lock_is_never_uploaded_to_the_hub():
    import fnmatch

    from diffusers_vrfm.hub import UPLOAD_IGNORE_PATTERNS

    assert any(fnmatch.fnmatch(LOCK_FILE_NAME, pattern) for pattern in UPLOAD_IGNORE_PATTERNS)
