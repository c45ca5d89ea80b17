"""Metrics logging: JSONL format and resume, optional wandb, process-0-only output."""

import io
import json
import logging
import os
import sys
import time
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medfinder_jax import logging as mlog
from medfinder_jax.config_utils import ConfigError


def _records(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_each_log_call_writes_one_json_line_with_step_time_and_metrics(tmp_path):
  path = tmp_path / "run" / "metrics.jsonl"
  before = time.time()
  with mlog.MetricsLogger(str(path)) as logger:
    logger.log(1, {"loss": jnp.float32(0.5), "accuracy_t2i": np.float64(0.25), "lr": 1e-4})
    logger.log(2, {"loss": jnp.array([0.25])})
  records = _records(path)
  assert [r["step"] for r in records] == [1, 2]
  assert records[0]["loss"] == 0.5 and records[0]["accuracy_t2i"] == 0.25
  assert records[0]["lr"] == 1e-4 and records[1]["loss"] == 0.25
  assert before - 1 <= records[0]["time"] <= time.time() + 1


def test_a_second_logger_appends(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with mlog.MetricsLogger(path) as logger:
    logger.log(1, {"loss": 1.0})
  with mlog.MetricsLogger(path) as logger:
    logger.log(2, {"loss": 0.5})
  assert [r["step"] for r in _records(path)] == [1, 2]


def test_resume_drops_records_after_the_checkpoint_step_and_torn_lines(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with mlog.MetricsLogger(path) as logger:
    for step in (10, 20, 30):
      logger.log(step, {"loss": 1.0 / step})
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"step": 40, "lo')  # killed mid-write
  with mlog.MetricsLogger(path, resume_step=20) as logger:
    logger.log(30, {"loss": 0.0})
  assert [r["step"] for r in _records(path)] == [10, 20, 30]
  assert _records(path)[-1]["loss"] == 0.0


def test_non_finite_values_are_strict_json_strings(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with mlog.MetricsLogger(path) as logger:
    logger.log(1, {"loss": float("nan"), "a": np.float32(np.inf), "b": jnp.float32(-np.inf)})
  with open(path, encoding="utf-8") as f:
    record = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
  assert (record["loss"], record["a"], record["b"]) == ("NaN", "Infinity", "-Infinity")
  assert np.isnan(float(record["loss"])) and float(record["a"]) == np.inf


def test_non_scalar_metric_is_refused(tmp_path):
  with mlog.MetricsLogger(str(tmp_path / "m.jsonl")) as logger:
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
      logger.log(1, {"loss": np.zeros(3)})


def test_only_process_zero_writes(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with mlog.MetricsLogger(str(path), is_main=False, wandb_mode="online") as logger:
    logger.log(1, {"loss": 1.0})
  assert not path.exists()
  assert mlog.MetricsLogger(str(tmp_path / "x.jsonl")).is_main  # one process: process 0


def test_unknown_wandb_mode_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match="wandb.mode='yes'"):
    mlog.MetricsLogger(str(tmp_path / "m.jsonl"), wandb_mode="yes")


class FakeRun:
  def __init__(self, calls):
    self.calls = calls

  def log(self, values, step):
    self.calls.append(("log", values, step))

  def finish(self):
    self.calls.append(("finish",))


def _fake_wandb(calls, fail_init=False):
  def init(**kwargs):
    if fail_init:
      raise RuntimeError("no API key")
    calls.append(("init", kwargs))
    return FakeRun(calls)
  return types.SimpleNamespace(init=init)


def test_disabled_wandb_is_never_imported(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would raise
  with mlog.MetricsLogger(str(tmp_path / "m.jsonl")) as logger:
    logger.log(1, {"loss": 1.0})
    assert not logger.wandb_active


def test_wandb_import_failure_warns_and_keeps_the_jsonl(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "wandb", None)
  path = str(tmp_path / "m.jsonl")
  with caplog.at_level(logging.WARNING):
    with mlog.MetricsLogger(path, wandb_mode="online") as logger:
      logger.log(1, {"loss": 1.0})
      assert not logger.wandb_active
  assert "cannot be imported" in caplog.text
  assert _records(path)[0]["loss"] == 1.0


def test_wandb_init_failure_warns_and_keeps_the_jsonl(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "wandb", _fake_wandb([], fail_init=True))
  path = str(tmp_path / "m.jsonl")
  with caplog.at_level(logging.WARNING):
    with mlog.MetricsLogger(path, wandb_mode="offline") as logger:
      logger.log(1, {"loss": 1.0})
  assert "no API key" in caplog.text
  assert len(_records(path)) == 1


def test_wandb_gets_the_metrics_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
  path = str(tmp_path / "m.jsonl")
  with mlog.MetricsLogger(path, wandb_mode="offline", wandb_project="MedFinder",
                          wandb_name="exp1", run_config={"seed": 42}) as logger:
    logger.log(5, {"loss": 0.5, "bad": float("nan")})
  init = calls[0][1]
  assert (init["mode"], init["project"], init["name"], init["config"]) == (
      "offline", "MedFinder", "exp1", {"seed": 42})
  assert len(init["id"]) == 8 and init["resume"] == "allow"
  assert calls[1][0] == "log" and calls[1][2] == 5 and calls[1][1]["loss"] == 0.5
  assert np.isnan(calls[1][1]["bad"])
  assert calls[-1] == ("finish",)
  with open(os.path.join(tmp_path, mlog.WANDB_ID_FILE), "w", encoding="utf-8") as f:
    f.write("earlier7\n")
  with mlog.MetricsLogger(path, resume_step=5, wandb_mode="offline"):
    pass
  assert [c for c in calls if c[0] == "init"][-1][1]["id"] == "earlier7"


def test_from_config_logs_into_output_dir(tmp_path):
  config = ml_collections.ConfigDict(dict(
      output_dir=str(tmp_path / "out"),
      wandb=dict(mode="disabled", project="MedFinder", name="")))
  with mlog.MetricsLogger.from_config(config) as logger:
    logger.log(0, {"loss": 2.0})
  assert _records(tmp_path / "out" / mlog.METRICS_FILE)[0]["loss"] == 2.0


def test_progress_bar_shows_on_process_zero_only():
  shown, hidden = io.StringIO(), io.StringIO()
  with mlog.progress_bar(10, initial=2, is_main=True, file=shown) as bar:
    bar.update(3)
    bar.set_postfix(loss=0.5)
  with mlog.progress_bar(10, is_main=False, file=hidden) as bar:
    bar.update(3)
  assert "5/10" in shown.getvalue() and "loss=0.5" in shown.getvalue()
  assert hidden.getvalue() == ""
