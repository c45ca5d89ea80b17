"""Commands run with their output on a small filesystem, to see what a full disk does.

A tmpfs of the given size is mounted in a private mount namespace (`unshare -m -r`: no root
needed, and nothing outside the test sees it). Inside, `script` (sh) runs with $SMALL naming the
mount; afterwards the mount's contents are copied to <work>/copy so the test can check what
survived. Tests skip (with the reason) where the kernel allows no such namespace.
"""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WRAPPER = """
mkdir -p "$SMALL" && mount -t tmpfs -o size="$SIZE" tmpfs "$SMALL" || exit 97
sh -c "$SCRIPT"
status=$?
mkdir -p "$WORK/copy" && cp -r "$SMALL"/. "$WORK/copy/"
exit $status
"""


def launch(*argv):
  """A shell command line running launch.py with this interpreter."""
  return " ".join([sys.executable, os.path.join(ROOT, "launch.py"), *map(str, argv)])


def run_on_small_disk(work, size, script, timeout=900, env=None):
  """Runs `script` with $SMALL on a tmpfs of `size` (e.g. "150m"); returns (exit code, the copy
  of what was on it). `work` is a normal directory for results; scripts write their outputs
  there (e.g. $WORK/stderr)."""
  if shutil.which("unshare") is None:
    pytest.skip("no unshare(1) on this machine")
  work = os.fspath(work)
  environ = {**os.environ, **(env or {}), "SMALL": os.path.join(work, "small"), "SIZE": size,
             "SCRIPT": script, "WORK": work}
  proc = subprocess.run(["unshare", "-m", "-r", "sh", "-c", _WRAPPER], env=environ, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode == 97 or "unshare failed" in proc.stderr:
    pytest.skip(f"cannot mount a tmpfs in a private namespace here: {proc.stderr.strip()}")
  return proc.returncode, os.path.join(work, "copy")


def read(work, name):
  with open(os.path.join(work, name), encoding="utf-8", errors="replace") as f:
    return f.read()
