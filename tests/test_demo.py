"""The reduced demo end to end, as a user runs it: retrieval is learned far above chance."""

import json
import os
import subprocess
import sys

from medfinder_jax import logging as logging_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reduced_demo_learns_retrieval_far_above_chance(tmp_path):
  out = tmp_path / "demo"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "PYTHONUNBUFFERED": "1"}
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), "demo", "--output_dir", str(out),
       "--n", "300", "--minutes", "8", "--config.train.epochs=14"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "Test split retrieval" in proc.stdout and "chance" in proc.stdout

  with open(out / "eval" / "metrics.json", encoding="utf-8") as f:
    metrics = json.load(f)
  assert metrics["split"] == "test" and metrics["n"] == 60
  assert metrics["t2i"]["R@10"] >= 2 * metrics["chance"]["R@10"]
  assert metrics["t2i"]["MdR"] < metrics["n"] / 4
  assert set(metrics["keywords"]) >= {"atelectasis", "pleural effusion"}
  # Zero-shot from the reports' findings: above chance, with the CI excluding 0.5, for the
  # findings that keyword retrieval already finds. Every finding's AUROC is in the output.
  zeroshot = metrics["zeroshot"]
  print("zero-shot AUROC:", {name: (zeroshot[name]["AUROC"], zeroshot[name]["ci"]["AUROC"])
                             for name in zeroshot["labels"]})
  for name in ("pleural effusion", "emphysema", "cardiomegaly", "consolidation"):
    assert zeroshot[name]["ci"]["AUROC"][0] > 0.5, (name, zeroshot[name])
  assert "zero-shot on N=60" in proc.stdout and "zero-shot: macro AUROC" in proc.stdout

  losses = [r["loss"] for r in logging_lib.read_metrics(out / "run" / "metrics.jsonl")
            if "loss" in r]
  assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3
  for name in ("eval/embeddings.npz", "eval/rank_histogram.png", "eval/recall_at_k.png",
               "training_curves.png", "tfrecords/conversion_report.json"):
    assert (out / name).is_file(), name


def test_a_config_without_a_demo_section_is_refused(capsys):
  import launch  # pylint: disable=import-outside-toplevel
  code = launch.main(["demo", "--config", os.path.join(ROOT, "configs", "default.py")])
  assert code == 2
  assert "has no `demo` section" in capsys.readouterr().err
