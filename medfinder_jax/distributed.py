"""Multi-process start-up: jax.distributed.initialize from flags or a detected cluster launcher.

One process per host drives all of that host's devices. The processes find each other through
explicit flags (--coordinator_address, --num_processes, --process_id) or through the environment
of a launcher jax knows (SLURM, Open MPI, Cloud TPU, JAX_COORDINATOR_ADDRESS). This must run
before any other JAX call; afterwards jax.devices() spans every process and one mesh
(sharding.make_mesh) covers them all.
"""

import os

import jax

from medfinder_jax import errors


class DistributedError(errors.UserError):
  """Multi-process JAX cannot start as asked (bad flags, a malformed launcher environment)."""


def is_main_process():
  """Process 0: the one that prints, logs and writes files shared by all processes."""
  return jax.process_index() == 0


def detect_cluster(environ=None):
  """Name of a multi-process launcher jax.distributed.initialize() can read, or None.

  "jax" (JAX_COORDINATOR_ADDRESS set), "slurm" (srun with >1 task), "openmpi" (mpirun with >1
  process), "tpu" (multi-host Cloud TPU). A single task under any of them counts as None.
  """
  env = os.environ if environ is None else environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "jax"
  slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID")
  if all(v in env for v in slurm_vars) and _env_int(env, "SLURM_NTASKS") > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and _env_int(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None,
                           environ=None):
  """Starts multi-process JAX when asked or when a cluster launcher is detected.

  Explicit flags go to jax.distributed.initialize as given (missing ones are auto-detected by
  jax); with no flags, a detected SLURM / Open MPI / TPU / JAX_COORDINATOR_ADDRESS environment
  calls jax.distributed.initialize() with no arguments; otherwise (one process) nothing happens.
  Must run before any other JAX call. Returns True when JAX runs multi-process.
  """
  if jax.distributed.is_initialized():
    return True
  flags = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  given = {k: v for k, v in flags.items() if v is not None}
  if given.get("num_processes") == 1 or (not given and detect_cluster(environ) is None):
    return False
  try:
    jax.distributed.initialize(**given)
  except (RuntimeError, ValueError) as err:
    shown = ", ".join(f"{k}={v!r}" for k, v in given.items()) or "auto-detected cluster"
    raise DistributedError(f"jax.distributed.initialize({shown}) failed: {err}") from err
  return True


def _env_int(env, name):
  """A launcher's process count; a malformed one is an error, not a silent single process."""
  text = env.get(name, "1")
  try:
    return int(text)
  except ValueError:
    raise DistributedError(f"environment variable {name}={text!r}: expected a number of processes "
                       "(set by the cluster launcher)") from None
