"""The workdir's `.lock`: one run at a time per workdir, a stale lock of a dead process taken over, and the
writability check that fails at once instead of hanging in a checkpoint library.

  with lock.lock(path):                 # a second run on `path` stops here with workdir.WorkdirBusy
    lock.check_writable(path + "/checkpoints")
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any, Iterator, Mapping

from absl import logging

from mri_poison.train.workdir import WorkdirBusy, WorkdirError, is_writer, now

LOCK_NAME = ".lock"



def check_writable(directory: str) -> None:
  """Creates `directory` if needed and proves it writable (a temp file created and removed).

  Raises a WorkdirError naming the folder and the OS error at once, where orbax would hang for minutes.
  Remote paths ("gs://...") go through etils.epath.
  """
  directory = os.fspath(directory)
  try:
    if "://" in directory:
      from etils import epath
      folder = epath.Path(directory)
      folder.mkdir(parents=True, exist_ok=True)
      probe = folder / f".write_probe.{os.getpid()}.{time.time_ns()}"
      probe.write_text("")
      probe.unlink()
      return
    os.makedirs(directory, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=directory)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"folder {directory} is not writable ({e}); fix its permissions or use another "
                       "--workdir") from e


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (clock ticks since boot; Linux only): tells a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _boot_id() -> str | None:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def _holder_is_dead(info: Mapping[str, Any]) -> bool:
  """True only for a lock of this host whose process is certainly gone (dead, rebooted, or pid reused)."""
  if info.get("host") != platform.node():
    return False
  pid = info.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  if info.get("boot_id") and _boot_id() and info["boot_id"] != _boot_id():
    return True
  if not _pid_alive(pid):
    return True
  started = _process_start(pid)
  return bool(info.get("pid_start") and started and started != info["pid_start"])


def _read_lock(path: str) -> dict | None:
  """The lock's JSON; None when it is gone. A lock being written (empty for microseconds) is re-read."""
  for _ in range(20):
    try:
      with open(path) as f:
        text = f.read()
    except FileNotFoundError:
      return None
    try:
      return json.loads(text)
    except ValueError:
      time.sleep(0.05)
  return {"unreadable": text[:200]}


_HELD: set[str] = set()  # lock paths this process holds (a nested lock of the same workdir is refused)


def _busy_message(workdir: str, path: str, info: Mapping[str, Any]) -> str:
  if "unreadable" in info:
    return (f"workdir {workdir} is locked by {path}, which is not a readable lock ({info['unreadable']!r}); if "
            f"you are sure no run uses this workdir, delete {path}")
  who = (f"pid {info.get('pid')} on host {info.get('host')} since {info.get('start')} "
         f"(command: {info.get('command')})")
  if info.get("host") == platform.node():
    why = "that process is still running"
  else:
    why = (f"a lock from another host is never broken automatically; if you are sure that run is over, "
           f"delete {path}")
  return f"workdir {workdir} is in use by {who}: {why}. Wait for it to end or use another --workdir."


def _take_stale(path: str, info: Mapping[str, Any]) -> bool:
  """Removes the stale lock `info` at `path` under a short-lived guard; False if another process is at it."""
  guard = path + ".takeover"
  try:
    os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
  except FileExistsError:
    with contextlib.suppress(OSError):
      if time.time() - os.path.getmtime(guard) > 30:  # left by a process killed during a takeover
        os.remove(guard)
    return False
  try:
    if _read_lock(path) == info:  # still the stale lock we judged, not a fresh one
      os.remove(path)
    return True
  finally:
    os.remove(guard)


@contextlib.contextmanager
def lock(workdir: str, *, command: str | None = None) -> Iterator[dict | None]:
  """Holds `<workdir>/.lock` (created atomically with O_CREAT|O_EXCL) for the block; yields its JSON.

  The lock records {pid, host, start, command}. A second run on the same workdir raises WorkdirBusy naming
  the holder. A lock of this host whose process is gone (killed with -9, machine rebooted) is stale and taken
  over with a warning; a lock from another host is never broken automatically. Released on exit, also on an
  exception. Only process 0 locks (the others yield None).
  """
  if not is_writer():
    yield None
    return
  workdir = os.path.abspath(os.fspath(workdir))
  path = os.path.join(workdir, LOCK_NAME)
  if path in _HELD:
    raise WorkdirBusy(f"workdir {workdir} is already locked by this process (pid {os.getpid()}): a nested run "
                      "on the same workdir; use another --workdir for the inner one")
  check_writable(workdir)
  info = {"pid": os.getpid(), "host": platform.node(), "start": now(),
          "command": command if command is not None else " ".join(sys.argv),
          "pid_start": _process_start(os.getpid()), "boot_id": _boot_id(), "token": os.urandom(8).hex()}
  text = json.dumps(info, indent=2) + "\n"
  deadline = time.monotonic() + 10.0
  while True:
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      held = _read_lock(path)
      if held is None:  # released between our open and our read
        continue
      if "unreadable" in held or not _holder_is_dead(held):
        raise WorkdirBusy(_busy_message(workdir, path, held)) from None
      logging.warning("workdir %s: taking over the stale lock of pid %s on %s (since %s, command: %s): that "
                      "process is no longer running", workdir, held.get("pid"), held.get("host"),
                      held.get("start"), held.get("command"))
      if not _take_stale(path, held):
        if time.monotonic() > deadline:
          raise WorkdirBusy(f"workdir {workdir}: another process keeps taking over the stale lock {path}") from None
        time.sleep(0.1)
      continue
    except OSError as e:
      raise WorkdirError(f"workdir {workdir}: cannot create the lock {path} ({e})") from e
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    break
  _HELD.add(path)
  try:
    yield info
  finally:
    _HELD.discard(path)
    if (_read_lock(path) or {}).get("token") == info["token"]:  # never remove a lock that is not ours
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    else:
      logging.warning("workdir %s: the lock %s was replaced or removed by someone else while this run held it",
                      workdir, path)
