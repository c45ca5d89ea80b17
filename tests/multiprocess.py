"""Running `launch.py` as several JAX processes on this machine (CPU, gloo collectives)."""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def launch_processes(argv, num_processes=2, devices_per_process=4, timeout=600, env=None):
  """Runs `python launch.py *argv` as `num_processes` processes of one JAX job.

  Each process gets --coordinator_address/--num_processes/--process_id and
  `devices_per_process` fake CPU devices. Returns [(returncode, stdout, stderr)] by process id;
  all processes are killed if one of them hangs past `timeout` seconds.
  """
  port = free_port()
  environ = {**os.environ, **(env or {}), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
             "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
  procs = []
  for pid in range(num_processes):
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), *argv,
           "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(num_processes),
           "--process_id", str(pid)]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  results = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=timeout)
      results.append((proc.returncode, out, err))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  return results
