"""`launch.py train`: user errors, resume checks, and (slow) real processes: 2 hosts x 4 devices,
SIGKILL + resume equal to a straight run, SIGTERM -> checkpoint and exit code 0.

Resume tolerance: the resumed run restores params, optimizer state, step, PRNG key and data
position exactly and runs the same compiled program on the same 8 devices, so its per-step
losses and final params must match the straight run to float32 rounding (rtol 1e-6, atol 1e-7;
in practice they are bitwise equal).
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import launch
from medfinder_jax import checkpoint
from medfinder_jax import loading
from medfinder_jax import logging as logging_lib
from conftest import TINY_CONFIG, make_tiny_config
from multiprocess import ROOT, free_port, launch_processes

TINY = ["--config", TINY_CONFIG]   # the tiny ResNet, MiniLM, 32-d embeddings, 1 per device


def train_argv(dataset, output_dir, *extra):
  return ["train", "--config.data.tfrecord_dir", dataset, "--output_dir", str(output_dir),
          *TINY, *extra]


# --- User errors (no training) --------------------------------------------------------------------

def test_a_raw_corpus_as_data_root_prints_the_convert_command(tmp_path, capsys):
  (tmp_path / "corpus" / "meta").mkdir(parents=True)
  code = launch.main(["train", "--data_root", str(tmp_path / "corpus"), *TINY])
  err = capsys.readouterr().err
  assert code == 2
  assert f"python launch.py convert --data_root {tmp_path / 'corpus'} --output_dir" in err
  assert "Traceback" not in err


def test_no_text_model_says_to_pass_a_bert_folder_or_minilm(tiny_dataset, tmp_path, capsys):
  code = launch.main(["train", "--data_root", tiny_dataset, "--output_dir", str(tmp_path),
                      "--batch_size=1", "--config.text.model_path="])
  err = capsys.readouterr().err
  assert code == 2 and "--config.text.model_path" in err and "minilm" in err


def test_resuming_with_another_backbone_batch_or_seed_is_refused(tiny_dataset, tmp_path, capsys,
                                                            tiny_config):
  """A checkpoint of another setup in output_dir: the error lists what differs, nothing runs."""
  from medfinder_jax import input_pipeline as ip  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"model.backbone": "vit", "train.batch_size_per_device": 2, "seed": 7})
  manager = checkpoint.make_manager(checkpoint.checkpoint_dir(str(tmp_path)))
  meta = checkpoint.build_meta(step=3, epoch=1, batches_consumed=3, seed=7, rng_key_data=[0, 1],
                               config=config, dataset_spec=ip.open_dataset(tiny_dataset)[1],
                               process_count=1, global_batch=16)
  checkpoint.save(manager, 3, {"params": {"w": np.zeros(2, np.float32)}},
                  {"count": np.zeros((), np.int32)}, meta)
  manager.wait_until_finished()
  manager.close()
  code = launch.main(train_argv(tiny_dataset, tmp_path))
  err = capsys.readouterr().err
  assert code == 2
  assert "model.backbone: checkpoint 'vit', now 'resnet50'" in err
  assert "train.batch_size_per_device: checkpoint 2, now 1" in err
  assert "global_batch: checkpoint 16, now 8" in err
  assert "seed: checkpoint 7, now 42" in err   # the released code fixes the data order
  assert "another --output_dir" in err


def test_a_truncated_text_weights_file_is_a_clear_error(tiny_dataset, tmp_path, capsys):
  import shutil  # pylint: disable=import-outside-toplevel
  from medfinder_jax import text  # pylint: disable=import-outside-toplevel
  minilm = text.resolve_text_model_path("minilm")
  folder = tmp_path / "bert"
  shutil.copytree(minilm, folder, ignore=shutil.ignore_patterns("*.safetensors"))
  with open(os.path.join(minilm, "model.safetensors"), "rb") as f:
    (folder / "model.safetensors").write_bytes(f.read(4096))   # a cut-off download
  code = launch.main(train_argv(tiny_dataset, tmp_path / "run",
                                f"--config.text.model_path={folder}"))
  err = capsys.readouterr().err
  assert code == 2
  assert "model.safetensors: not a readable safetensors file" in err
  assert "Traceback" not in err


# --- Real processes (slow) ------------------------------------------------------------------------

def run_train(argv, env=None):
  """`python launch.py *argv` in one process with 8 CPU devices (blocking)."""
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *argv], cwd=ROOT,
                        env=_env(env), capture_output=True, text=True, timeout=900)


def _env(extra=None):
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
          "XLA_FLAGS": "--xla_force_host_platform_device_count=8", **(extra or {})}


def _compile_cache(tmp_path_factory):
  """A persistent XLA cache shared by the processes of one test: they compile the same step."""
  return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.mark.slow
def test_two_hosts_train_and_one_process_restores_the_checkpoint(tiny_dataset, tmp_path):
  out = tmp_path / "run"
  results = launch_processes(train_argv(tiny_dataset, out, "--config.train.max_steps=4",
                                        "--config.train.eval_every_steps=2",
                                        "--config.train.log_every_steps=1"),
                             num_processes=2, devices_per_process=4, timeout=900)
  for code, stdout, stderr in results:
    assert code == 0, stderr[-4000:]
  assert "checkpoints:" in results[0][1]
  records = logging_lib.read_metrics(out / "metrics.jsonl")  # written by process 0 only, once
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
  loaded = loading.load_model(str(out), make_tiny_config())
  assert loaded.identity["step"] in (2, 4)
  assert checkpoint.read_meta(str(out))["val_metrics"]["n"] == 4
  assert checkpoint.read_meta(str(out), step=4)["process_count"] == 2
  volume = np.zeros((2, *loaded.spec.shape, 1), np.float32)
  embedding = loaded.model.apply(loaded.variables, volume, method=loaded.model.encode_image)
  assert embedding.shape == (2, 32) and np.all(np.isfinite(embedding))


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_dataset, tmp_path,
                                                          tmp_path_factory):
  """8 steps straight vs a run SIGKILLed right after its step-4 checkpoint, then resumed."""
  env = _compile_cache(tmp_path_factory)
  flags = ["--config.train.max_steps=8", "--config.train.checkpoint_every_steps=2",
           "--config.train.log_every_steps=1", "--config.train.eval_every_steps=100",
           "--config.train.keep_checkpoints=10"]
  straight = run_train(train_argv(tiny_dataset, tmp_path / "straight", *flags), env)
  assert straight.returncode == 0, straight.stderr[-4000:]

  killed_dir = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"),
                           *train_argv(tiny_dataset, killed_dir, *flags)], cwd=ROOT,
                          env=_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  step4 = killed_dir / "checkpoints" / "4"
  deadline = time.time() + 600
  while not step4.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert step4.exists(), "the killed run never wrote its step-4 checkpoint"
  resumed_from = checkpoint.read_meta(str(killed_dir))["step"]  # latest finished step
  assert 4 <= resumed_from < 8, f"killed too late (latest checkpoint {resumed_from})"

  resumed = run_train(train_argv(tiny_dataset, killed_dir, *flags), env)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert f"resuming from step {resumed_from}" in resumed.stdout

  losses_of = lambda run: {r["step"]: r for r in logging_lib.read_metrics(run / "metrics.jsonl")
                           if "loss" in r}
  want, got = losses_of(tmp_path / "straight"), losses_of(killed_dir)
  assert sorted(got) == sorted(want) == list(range(1, 9))   # log reads like one run
  for step in range(1, 9):       # same batches and same augmentation/dropout draws
    np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=1e-6, err_msg=step)
  meta = checkpoint.read_meta(str(killed_dir), step=8)
  assert meta["batches_consumed"] == 8
  a, b = (loading.load_model(os.path.join(checkpoint.checkpoint_dir(str(run)), "8"),
                             make_tiny_config()).variables
          for run in (tmp_path / "straight", killed_dir))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_with_code_0(tiny_dataset, tmp_path):
  out = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"),
                           *train_argv(tiny_dataset, out, "--config.train.max_steps=100000",
                                       "--config.train.log_every_steps=1")],
                          cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics_file = out / "metrics.jsonl"
  deadline = time.time() + 600
  while proc.poll() is None and time.time() < deadline:
    if metrics_file.exists() and len(logging_lib.read_metrics(metrics_file)) >= 2:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-4000:]
  stopped = re.search(r"stopped at step (\d+) \(SIGTERM\); checkpoint saved", stdout)
  assert stopped, stdout[-2000:]
  step = int(stopped.group(1))
  assert step >= 2 and checkpoint.read_meta(str(out), step=step)["batches_consumed"] == step
  assert "rerun the same command to resume" in stdout


@pytest.mark.slow
def test_sigterm_to_every_host_stops_all_at_one_agreed_step(tiny_dataset, tmp_path):
  """As SLURM preempts a job: SIGTERM to both processes; jax's preemption service makes them
  agree on a step, both save it together and exit with code 0."""
  out, port = tmp_path / "run", free_port()
  argv = train_argv(tiny_dataset, out, "--config.train.max_steps=100000",
                    "--config.train.log_every_steps=1")
  env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *argv,
                             "--coordinator_address", f"127.0.0.1:{port}", "--num_processes",
                             "2", "--process_id", str(pid)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for pid in range(2)]
  metrics_file = out / "metrics.jsonl"
  deadline = time.time() + 600
  while all(p.poll() is None for p in procs) and time.time() < deadline:
    if metrics_file.exists() and len(logging_lib.read_metrics(metrics_file)) >= 2:
      break
    time.sleep(0.05)
  for proc in procs:
    proc.send_signal(signal.SIGTERM)
  outputs = [proc.communicate(timeout=300) for proc in procs]
  for proc, (_, stderr) in zip(procs, outputs):
    assert proc.returncode == 0, stderr[-4000:]
  stopped = re.search(r"stopped at step (\d+) \(preempted\); checkpoint saved", outputs[0][0])
  assert stopped, outputs[0][0][-2000:]
  step = int(stopped.group(1))
  assert checkpoint.read_meta(str(out), step=step)["process_count"] == 2


@pytest.mark.slow
def test_a_full_disk_stops_training_with_a_message_and_the_saved_steps_resume(tiny_dataset,
                                                                            tmp_path):
  """150 MB hold one checkpoint of the tiny model (about 96 MB: the MiniLM text tower) but not
  two: the run stops cleanly at the second, and step 1 resumes on a larger disk."""
  from small_disk import launch as command, read, run_on_small_disk  # pylint: disable=import-outside-toplevel
  train = command(*train_argv(tiny_dataset, "$SMALL/run", "--config.train.max_steps=3",
                              "--config.train.checkpoint_every_steps=1"))
  code, copy = run_on_small_disk(tmp_path, "150m", f"{train} > $WORK/stdout 2> $WORK/stderr; "
                                                   f"echo $? > $WORK/code")
  assert code == 0 and read(tmp_path, "code").strip() == "2"
  err = read(tmp_path, "stderr").replace("\r", "\n")
  assert "launch.py train: error: " in err and "not enough space for checkpoint step 2" in err
  assert "steps saved before ([1]) are intact" in err and "Traceback" not in err
  run_dir = os.path.join(copy, "run")
  assert checkpoint.read_meta(run_dir)["step"] == 1
  code = launch.main(train_argv(tiny_dataset, run_dir, "--config.train.max_steps=3",
                                "--config.train.checkpoint_every_steps=1"))
  assert code == 0 and checkpoint.read_meta(run_dir)["step"] == 3
