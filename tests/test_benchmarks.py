"""Benchmark scripts run and report what they promise (speed itself is not asserted here)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import run_all  # noqa: E402  pylint: disable=wrong-import-position

NO_TENSORFLOW = ("import runpy, sys; sys.modules['tensorflow'] = None; "
                 "sys.modules['tensorflow_datasets'] = None; sys.argv = {argv!r}; "
                 "runpy.run_path({path!r}, run_name='__main__')")


def run_script(code):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "PYTHONPATH": ROOT}
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])


def test_train_step_benchmark_needs_no_tensorflow():
  """GPU images carry JAX and PyTorch but not TensorFlow: the train step must not import it."""
  path = os.path.join(ROOT, "benchmarks", "train_step.py")
  argv = [path, "--config", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--json"]
  result = run_script(NO_TENSORFLOW.format(argv=argv, path=path))
  assert result["global_batch"] == 2 and result["gflops_per_step"] > 0
  assert result["ms_per_step"] > 0 and result["achieved_tflops"] > 0


def test_torch_reference_reports_the_same_fields():
  path = os.path.join(ROOT, "benchmarks", "torch_reference.py")
  argv = [path, "--shape", "16,16,8", "--batch", "2", "--text", "minilm", "--tokens", "16",
          "--resnet_layers", "1,1,1,1", "--resnet_widths", "4,8,8,16", "--conv1_kernel", "3",
          "--steps", "1", "--warmup", "0", "--json"]
  result = run_script(f"import runpy, sys; sys.argv = {argv!r}; "
                      f"runpy.run_path({path!r}, run_name='__main__')")
  for field in ("ms_per_step", "volumes_per_s", "gflops_per_step", "achieved_tflops",
                "peak_rss_gib"):
    assert result[field] > 0, field
  assert result["precision"] == "float32" and result["platform"] == "cpu"


def test_run_all_table_gives_jax_over_pytorch_ratios():
  rows = [{"name": "case a", "framework": "pytorch",
           "result": {"ms_per_step": 100.0, "volumes_per_s": 10.0, "achieved_tflops": 1.0,
                      "peak_rss_gib": 1.0}},
          {"name": "case a", "framework": "jax",
           "result": {"ms_per_step": 50.0, "volumes_per_s": 20.0, "achieved_tflops": 2.0,
                      "peak_rss_gib": 1.5}},
          {"name": "case b", "framework": "jax", "error": "exit 1: out of memory"}]
  text = run_all.table(rows)
  assert "2.00x" in text and "ERROR exit 1: out of memory" in text


def test_every_gpu_case_names_an_existing_script_and_config():
  for case in run_all.gpu_set() + run_all.cpu_set():
    assert os.path.isfile(case["argv"][1])
    if "--config" in case["argv"]:
      assert os.path.isfile(case["argv"][case["argv"].index("--config") + 1])
