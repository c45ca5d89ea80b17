"""Stopping a run cleanly: SIGTERM / SIGINT, jax's multi-host preemption notice, a time budget.

The train loop asks `StopRequest` at every step whether to stop; when it says so, the loop saves
a checkpoint and returns, and rerunning the same command resumes. All processes of a
multi-process run must stop at the same step, so a stop is agreed on collectively (jax's
preemption sync point, or an all-gather of everyone's flag at log points).
"""

import signal
import threading
import time

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # the preemption manager's state
from jax.experimental import multihost_utils

from medfinder_jax import distributed


def _preemption_service_running():
  """Whether jax.distributed.initialize started the preemption sync manager (on by default)."""
  return getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None


class StopRequest:
  """Records SIGTERM / SIGINT (and jax's multi-host preemption notice) so the loop can save a
  checkpoint and exit cleanly. Single process: Python handlers for both signals. Several
  processes: SIGTERM is left to jax's preemption service (all processes agree on the step via
  reached_preemption_sync_point) when it runs, else recorded like SIGINT; SIGINT is recorded
  locally and agreed on at log points.
  `deadline` (time.time() seconds, optional): past it, a stop is requested the same way
  (config train.max_minutes)."""

  def __init__(self, deadline=None):
    self.reason = None
    self.deadline = deadline
    self._previous = {}
    self.multiprocess = jax.process_count() > 1
    self.preemption_service = self.multiprocess and _preemption_service_running()
    if self.multiprocess and not self.preemption_service:
      if distributed.is_main_process():
        print("note: jax's preemption service is off (jax_enable_preemption_service): SIGTERM "
              "is handled at log points (train.log_every_steps), like Ctrl-C", flush=True)

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    signals = (signal.SIGINT,) if self.preemption_service else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    if self.reason is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: stop now
    self.reason = signal.Signals(signum).name

  def preempted(self, step):
    """jax's preemption sync point (multi-process only); call at every step."""
    if not self.preemption_service:
      return False
    return multihost_utils.reached_preemption_sync_point(step)

  def agreed(self):
    """Whether any process asked to stop (a collective in multi-process runs)."""
    if self.reason is None and self.deadline is not None and time.time() >= self.deadline:
      self.reason = "time budget"
    if not self.multiprocess:
      return self.reason is not None
    flags = multihost_utils.process_allgather(np.int32(self.reason is not None))
    return bool(np.any(flags))
