"""launch.py as a whole: nonsense flags and settings are refused before any work, each with one
line naming the field (exit 2, no traceback), whatever the command."""

import pytest

from model_files import run_launch as run


@pytest.mark.parametrize("argv, field", [
    (["train", "--batch_size", "0"], "train.batch_size_per_device=0"),
    (["train", "--batch_size", "-2"], "train.batch_size_per_device=-2"),
    (["train", "--epochs", "-1"], "train.epochs=-1"),
    (["train", "--epochs", "0"], "nothing to train"),
    (["train", "--lr", "0"], "train.lr=0.0"),
    (["train", "--config.train.grad_accum_steps=0"], "train.grad_accum_steps=0"),
    (["convert", "--data_root", "/nowhere", "--output_dir", "/tmp/x", "--workers", "-1"],
     "data.workers=-1"),
    (["convert", "--data_root", "/nowhere", "--output_dir", "/tmp/x",
      "--config.data.shard_size=0"], "data.shard_size=0"),
    (["eval", "--model_path", "/nowhere", "--config.eval.ci_level=1.5"], "eval.ci_level=1.5"),
    (["eval", "--model_path", "/nowhere", "--config.eval.recall_ks=0,-1"],
     "eval.recall_ks=(0, -1)"),
    (["metrics", "--embeddings", "/nowhere.npz", "--config.eval.bootstrap_samples=-3"],
     "--bootstrap must be 0"),
    (["demo", "--n", "20"], "--n 20: the train split would hold 14 studies, fewer than one "
                            "global batch"),
    (["demo", "--n", "5"], "--n must be at least 20"),
])
def test_nonsense_settings_exit_2_with_one_line_naming_the_field(argv, field, capsys):
  code, out, err = run(argv, capsys)
  assert code == 2 and out == "" and "Traceback" not in err
  assert err.startswith(f"launch.py {argv[0]}: error: ") and field in err
  assert len(err.strip().splitlines()) == 1, err


def test_a_missing_checkpoint_is_named_before_the_dataset(capsys):
  code, _, err = run(["eval", "--model_path", "/nowhere/run"], capsys)   # no dataset either
  assert code == 2 and "/nowhere/run: no such checkpoint" in err


def test_commands_print_no_library_start_up_noise(aligned, tmp_path):
  """TensorFlow's start-up notices and tfds/orbax absl warnings stay out of a command's output."""
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from conftest import TINY_CONFIG  # pylint: disable=import-outside-toplevel
  from multiprocess import ROOT  # pylint: disable=import-outside-toplevel
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), "eval", "--model_path",
       aligned.released_path, "--split", "test", "--output_dir", str(tmp_path), "--bootstrap",
       "0", "--config", TINY_CONFIG, "--config.model.fusion.enabled=false",
       f"--config.data.tfrecord_dir={aligned.dataset_dir}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  noise = [line for line in (proc.stdout + proc.stderr).replace("\r", "\n").splitlines()
           if any(word in line for word in ("WARNING:absl", "oneDNN", "deprecated", "W0000",
                                            "I0000", "E0000"))]
  assert noise == []
