"""`launch.py eval`: embeddings + metrics of a checkpoint (released .pt or ours) on a split, any
number of processes; clear errors for user mistakes.

The model is constructed, not trained: its image projection is fitted so that each test-split
volume lands on its report's embedding (model_files.align_image_projection), so the expected
retrieval is known (perfect) and the embeddings have an independent reference (model.apply).
"""

import json
import os

import numpy as np
import pytest

import model_files
from model_files import run_launch as run
from conftest import TINY_CONFIG
from multiprocess import launch_processes

NO_FUSION = "--config.model.fusion.enabled=false"


def eval_argv(model_path, output_dir, *more, dataset=None):
  argv = ["eval", "--model_path", model_path, "--split", "test", "--output_dir", str(output_dir),
          "--config", TINY_CONFIG, NO_FUSION, *more]
  return argv + ([f"--config.data.tfrecord_dir={dataset}"] if dataset else [])


def test_eval_of_a_released_checkpoint_writes_embeddings_metrics_and_the_table(aligned, tmp_path,
                                                                          capsys):
  code, out, err = run(eval_argv(aligned.released_path, tmp_path, "--bootstrap", "20", "--plots",
                                 dataset=aligned.dataset_dir), capsys)
  assert code == 0, err
  assert "fusion disabled" not in err          # the config already had no fusion
  lines = out.splitlines()
  assert lines[0].split() == ["N=8", "R@1", "R@5", "R@10", "MdR", "MnR"]
  assert [line.split()[0] for line in lines[1:4]] == ["t2i", "i2t", "chance"]
  assert [line.split()[0] for line in lines[6:9]] == ["atelectasis", "consolidation",
                                                      "adenopathy"]
  embeddings = np.load(tmp_path / "embeddings.npz")
  assert list(embeddings["study_ids"]) == aligned.study_ids
  np.testing.assert_allclose(embeddings["image_embeddings"], aligned.image, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(embeddings["text_embeddings"], aligned.text, rtol=1e-4, atol=1e-5)
  assert list(embeddings["keywords"]) == ["atelectasis", "consolidation", "adenopathy"]
  metrics = json.load(open(tmp_path / "metrics.json"))
  assert metrics["t2i"]["R@1"] == metrics["i2t"]["R@1"] == 100.0   # aligned by construction
  assert metrics["split"] == "test" and metrics["n"] == 8 and metrics["ci"]["samples"] == 20
  assert metrics["model"]["kind"] == "released"
  assert metrics["model"]["checkpoint"] == os.path.abspath(aligned.released_path)
  for name in ("rank_histogram.png", "recall_at_k.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
  # Zero-shot: labels read from the reports for the configured findings, thresholds from val.
  findings = ["nodule", "mass", "consolidation", "pleural effusion", "atelectasis", "adenopathy",
              "emphysema", "cardiomegaly"]
  assert list(embeddings["label_names"]) == findings
  assert embeddings["labels"].shape == (8, 8) and embeddings["label_thresholds"].shape == (8,)
  assert embeddings["prompt_embeddings"].shape == (8, 2, embeddings["image_embeddings"].shape[1])
  zeroshot = metrics["zeroshot"]
  assert zeroshot["labels"] == findings and zeroshot["threshold_source"] == "validation split"
  for name in findings:
    entry = zeroshot[name]
    assert entry["n_positive"] == int(embeddings["labels"][:, findings.index(name)].sum())
    assert entry["AUROC"] is None or 0.0 <= entry["AUROC"] <= 1.0
    if entry["AUROC"] is not None:
      assert (tmp_path / f"roc_{name.replace(' ', '_')}.png").read_bytes()[:4] == b"\x89PNG"
  assert "AUROC chance 0.5" in out and out.count("[") > 10
  assert metrics["volume_retrieval"]["gallery_size"] == 7      # the query left out


def zeroshot_lines(out):
  lines = out.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("zero-shot on"))
  return lines[start:start + 11]


def test_metrics_command_on_the_written_npz_gives_the_same_numbers(aligned, tmp_path, capsys):
  code, printed, _ = run(eval_argv(aligned.released_path, tmp_path / "eval", "--bootstrap", "0",
                                   dataset=aligned.dataset_dir), capsys)
  assert code == 0
  written = json.load(open(tmp_path / "eval" / "metrics.json"))
  code, out, _ = run(["metrics", "--embeddings", str(tmp_path / "eval" / "embeddings.npz"),
                      "--bootstrap", "0", "--output_dir", str(tmp_path / "again")], capsys)
  again = json.load(open(tmp_path / "again" / "metrics.json"))
  assert code == 0
  for field in ("t2i", "i2t", "keywords", "volume_retrieval", "zeroshot", "gallery"):
    assert again[field] == written[field], field
  assert zeroshot_lines(out) == zeroshot_lines(printed)   # the table eval printed


def test_released_checkpoint_with_fusion_configured_runs_unfused_and_says_so(aligned, tmp_path,
                                                                         capsys):
  argv = eval_argv(aligned.released_path, tmp_path, "--bootstrap", "0", dataset=aligned.dataset_dir)
  argv.remove(NO_FUSION)                                             # fusion enabled
  code, _, err = run(argv, capsys)
  assert code == 0 and "no fusion weights" in err and "fusion disabled" in err
  embeddings = np.load(tmp_path / "embeddings.npz")
  np.testing.assert_allclose(embeddings["image_embeddings"], aligned.image, rtol=1e-4, atol=1e-5)


def test_eval_of_our_checkpoint_uses_its_config_and_its_training_dataset(aligned, tmp_path,
                                                                        capsys):
  argv = ["eval", "--model_path", aligned.run_dir, "--split", "test", "--output_dir",
          str(tmp_path), "--bootstrap", "0"]                 # default config, no dataset given
  code, out, err = run(argv, capsys)
  assert code == 0, err
  assert "checkpoint step 7" in err and out.splitlines()[0].startswith("N=8")
  metrics = json.load(open(tmp_path / "metrics.json"))
  assert metrics["model"]["kind"] == "checkpoint" and metrics["model"]["step"] == 7
  assert metrics["dataset"] == os.path.abspath(aligned.dataset_dir)
  assert metrics["t2i"]["R@1"] == 100.0
  np.testing.assert_allclose(np.load(tmp_path / "embeddings.npz")["image_embeddings"],
                             aligned.image, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case,message", [
    ("missing_checkpoint", "no such checkpoint"),
    ("empty_run_dir", "holds no checkpoint"),
    ("no_dataset", "no dataset: pass --config.data.tfrecord_dir"),
    ("raw_data_root", "not a converted dataset"),
    ("wrong_backbone", "does not match the model"),
    ("negative_bootstrap", "--bootstrap must be 0"),
    ("bad_ties", "config eval.ties='median'"),
])
def test_user_mistakes_exit_2_with_a_message_not_a_traceback(aligned, tmp_path, capsys, case,
                                                            message):
  (tmp_path / "empty_run").mkdir()
  argv = {
      "missing_checkpoint": eval_argv(str(tmp_path / "best_model.pt"), tmp_path,
                                      dataset=aligned.dataset_dir),
      "empty_run_dir": eval_argv(str(tmp_path / "empty_run"), tmp_path,
                                 dataset=aligned.dataset_dir),
      "no_dataset": eval_argv(aligned.released_path, tmp_path),
      "raw_data_root": eval_argv(aligned.released_path, tmp_path, "--data_root", aligned.raw_dir),
      "wrong_backbone": eval_argv(aligned.released_path, tmp_path, "--backbone", "vit",
                                  dataset=aligned.dataset_dir),
      "negative_bootstrap": eval_argv(aligned.released_path, tmp_path, "--bootstrap", "-1",
                                      dataset=aligned.dataset_dir),
      "bad_ties": eval_argv(aligned.released_path, tmp_path, "--config.eval.ties=median",
                            dataset=aligned.dataset_dir),
  }[case]
  code, out, err = run(argv, capsys)
  assert code == 2 and out == ""
  assert "launch.py eval: error: " in err and message in err and "Traceback" not in err
  assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["released", "ours"])
def test_two_processes_count_every_study_once_with_a_ragged_last_batch(aligned, tmp_path, kind):
  # 8 test studies, 2 processes x 4 devices x 3 per device = a global batch of 24.
  if kind == "released":
    argv = eval_argv(aligned.released_path, tmp_path, "--bootstrap", "0",
                     "--config.eval.batch_size_per_device=3", dataset=aligned.dataset_dir)
  else:
    argv = ["eval", "--model_path", aligned.run_dir, "--split", "test", "--output_dir",
            str(tmp_path), "--bootstrap", "0", "--config.eval.batch_size_per_device=3"]
  results = launch_processes(argv, num_processes=2, devices_per_process=4, timeout=300)
  for code, _, err in results:
    assert code == 0, err[-3000:]
  # Only process 0 prints (gloo's own connection messages also go to stdout, interleaved).
  assert "N=8" in results[0][1] and "wrote " in results[0][1]
  assert not any(word in results[1][1] for word in ("N=8", "t2i", "wrote "))
  embeddings = np.load(tmp_path / "embeddings.npz")
  assert list(embeddings["study_ids"]) == aligned.study_ids   # each once, dataset order
  np.testing.assert_allclose(embeddings["image_embeddings"], aligned.image, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(embeddings["text_embeddings"], aligned.text, rtol=1e-4, atol=1e-5)
  assert json.load(open(tmp_path / "metrics.json"))["t2i"]["R@1"] == 100.0


@pytest.mark.parametrize("damage, message", [("truncated", "cannot read variables"),
                                             ("no_meta", "meta/ missing")])
def test_a_damaged_checkpoint_names_the_step_and_exits_2(aligned, tmp_path, damage, message):
  """In a process of its own, as a user runs it: the one line is all that is printed (orbax's
  abandoned reads report nothing more)."""
  import shutil  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from multiprocess import ROOT  # pylint: disable=import-outside-toplevel
  from test_checkpoint import truncate_largest_array_file  # pylint: disable=import-outside-toplevel
  run_dir = shutil.copytree(aligned.run_dir, tmp_path / "run")
  step_dir = run_dir / "checkpoints" / "7"
  if damage == "truncated":
    truncate_largest_array_file(str(step_dir))
  else:
    shutil.rmtree(step_dir / "meta")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), "eval", "--model_path", str(run_dir),
       "--split", "test", "--output_dir", str(tmp_path / "out"), "--bootstrap", "0",
       f"--config.data.tfrecord_dir={aligned.dataset_dir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  err = proc.stderr.replace("\r", "\n")
  lines = [line for line in err.splitlines() if line.strip() and "embed test" not in line]
  assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in err, err[-3000:]
  assert lines[0].startswith("launch.py eval: error: ") and str(step_dir) in lines[0]
  assert message in lines[0] and len(lines) == 1, lines
