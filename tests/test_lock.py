"""The workdir lock: exclusive, released, a dead holder's stale lock taken over (not a foreign host's); the
writability check."""
import json
import os
import platform
import subprocess
import sys
import time

import pytest

from mri_poison.train import lock as lock_lib
from mri_poison.train import workdir as wd


def test_lock_is_exclusive_and_released(tmp_path):
  lock_file = tmp_path / ".lock"
  with lock_lib.lock(str(tmp_path), command="train a") as info:
    held = json.load(open(lock_file))
    assert (held["pid"], held["host"], held["command"]) == (os.getpid(), platform.node(), "train a")
    assert held["start"] == info["start"]
    with pytest.raises(wd.WorkdirBusy, match=f"pid {os.getpid()}"):  # nested in this process
      with lock_lib.lock(str(tmp_path)):
        pass
  assert not lock_file.exists()

  # A live process of this host holds it: a second run stops at once, naming the holder.
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    lock_file.write_text(json.dumps({"pid": sleeper.pid, "host": platform.node(), "start": "2024-05-01T10:00:00",
                                     "command": "other run"}))
    t0 = time.perf_counter()
    with pytest.raises(wd.WorkdirBusy) as e:
      with lock_lib.lock(str(tmp_path)):
        pass
    assert time.perf_counter() - t0 < 2.0
    assert f"pid {sleeper.pid}" in str(e.value) and "2024-05-01T10:00:00" in str(e.value)
    assert json.load(open(lock_file))["pid"] == sleeper.pid  # left alone
  finally:
    sleeper.kill()
    sleeper.wait()

  # Released after an exception in the block.
  lock_file.unlink()
  with pytest.raises(KeyError):
    with lock_lib.lock(str(tmp_path)):
      raise KeyError("boom")
  assert not lock_file.exists()


def test_stale_lock_is_taken_over_but_not_a_foreign_hosts(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()  # reaped: its pid no longer runs
  lock_file = tmp_path / ".lock"
  lock_file.write_text(json.dumps({"pid": dead.pid, "host": platform.node(), "start": "2024-05-01T10:00:00",
                                   "command": "killed run"}))
  with lock_lib.lock(str(tmp_path)):
    assert json.load(open(lock_file))["pid"] == os.getpid()
  assert not lock_file.exists()
  assert any("stale lock" in r.getMessage() and str(dead.pid) in r.getMessage() for r in caplog.records)

  lock_file.write_text(json.dumps({"pid": dead.pid, "host": "elsewhere-node-7", "start": "2024-05-01T10:00:00",
                                   "command": "remote run"}))
  with pytest.raises(wd.WorkdirBusy, match="elsewhere-node-7") as e:
    with lock_lib.lock(str(tmp_path)):
      pass
  assert "never broken automatically" in str(e.value) and str(lock_file) in str(e.value)
  assert json.load(open(lock_file))["host"] == "elsewhere-node-7"


def test_check_writable_fails_at_once(tmp_path):
  lock_lib.check_writable(str(tmp_path / "a" / "checkpoints"))  # created
  assert os.listdir(tmp_path / "a" / "checkpoints") == []  # the probe is removed
  blocker = tmp_path / "file"
  blocker.write_text("x")
  t0 = time.perf_counter()
  with pytest.raises(wd.WorkdirError, match="file/ckpt") as e:  # fails for root too
    lock_lib.check_writable(str(blocker / "ckpt"))
  assert "Not a directory" in str(e.value) or "exists" in str(e.value)
  assert time.perf_counter() - t0 < 1.0


def test_check_writable_read_only_folder(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  os.chmod(ro, 0o500)
  try:
    if os.access(ro, os.W_OK):
      pytest.skip("running as root: chmod does not stop writes")
    t0 = time.perf_counter()
    with pytest.raises(wd.WorkdirError, match="Permission denied") as e:
      lock_lib.check_writable(str(ro))
    assert str(ro) in str(e.value) and time.perf_counter() - t0 < 1.0
  finally:
    os.chmod(ro, 0o700)
