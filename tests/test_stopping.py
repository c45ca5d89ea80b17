"""Stopping cleanly: signals are recorded (and handlers restored), whatever the process count."""

import os
import signal
import time

import jax
import pytest

from medfinder_jax import stopping


def test_without_the_preemption_service_sigterm_is_still_recorded(monkeypatch):
  """Several processes but jax's preemption service off: SIGTERM must not kill the run unsaved."""
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(stopping, "_preemption_service_running", lambda: False)
  with stopping.StopRequest() as stop:
    assert not stop.preempted(5)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert stop.reason == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_deadline_in_the_past_asks_to_stop_for_the_time_budget():
  with stopping.StopRequest(deadline=time.time() - 1) as stop:
    assert stop.agreed() and stop.reason == "time budget"
  with stopping.StopRequest(deadline=time.time() + 3600) as stop:
    assert not stop.agreed() and stop.reason is None


def test_ctrl_c_asks_to_stop_and_a_second_one_stops_at_once():
  # Python's own handler, as in a terminal (a job started in the background inherits SIG_IGN).
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with stopping.StopRequest() as stop:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
      assert stop.reason == "SIGINT" and stop.agreed()
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # restored
  finally:
    signal.signal(signal.SIGINT, previous)
