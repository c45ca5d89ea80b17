"""Multi-process start-up: flags, cluster detection, clear errors (no real processes here;
tests/test_sharding.py runs two)."""

import jax
import pytest

from medfinder_jax import distributed


def test_single_process_is_a_no_op(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert distributed.initialize_distributed(environ={}) is False
  assert distributed.initialize_distributed(num_processes=1, environ={}) is False
  assert calls == []


def test_explicit_flags_are_passed_to_jax(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert distributed.initialize_distributed("10.0.0.1:1234", 2, 1, environ={}) is True
  assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                    "process_id": 1}]


SLURM_2_TASKS = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
                 "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("environ, cluster", [
    (SLURM_2_TASKS, "slurm"),
    ({**SLURM_2_TASKS, "SLURM_NTASKS": "1"}, None),
    ({"OMPI_MCA_orte_hnp_uri": "1;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "jax"),
    ({}, None)])
def test_cluster_detection(environ, cluster):
  assert distributed.detect_cluster(environ) == cluster


def test_a_malformed_process_count_is_an_error_naming_the_variable():
  with pytest.raises(distributed.DistributedError, match="SLURM_NTASKS='2\\(x2\\)'"):
    distributed.detect_cluster({**SLURM_2_TASKS, "SLURM_NTASKS": "2(x2)"})


def test_detected_cluster_calls_jax_auto_detection(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert distributed.initialize_distributed(environ=SLURM_2_TASKS) is True
  assert calls == [{}]


def test_initialize_failure_names_the_flags(monkeypatch):
  def fail(**kw):
    raise RuntimeError("connection refused")
  monkeypatch.setattr(jax.distributed, "initialize", fail)
  with pytest.raises(distributed.DistributedError, match="coordinator_address='h:1'.*connection refused"):
    distributed.initialize_distributed("h:1", 2, 0, environ={})
