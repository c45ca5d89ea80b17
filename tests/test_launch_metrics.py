"""`launch.py metrics`: offline metrics of an embeddings.npz, and clear errors for user mistakes."""

import json

import numpy as np
import pytest

import launch


def write_embeddings(path, n=40, d=8, **changes):
  rng = np.random.default_rng(0)
  image = rng.normal(size=(n, d)).astype(np.float32)
  fields = {"image_embeddings": image,
            "text_embeddings": image + 0.3 * rng.normal(size=(n, d)).astype(np.float32),
            "study_ids": np.array([f"s{i}" for i in range(n)]),
            "reports": np.array(["Right lower lobe atelectasis." if i % 2 else "No atelectasis."
                                 for i in range(n)]),
            "keywords": np.array(["atelectasis"]),
            "keyword_embeddings": image[1::2].mean(axis=0, keepdims=True)}
  fields.update(changes)
  np.savez(path, **fields)
  return str(path)


def run(argv, capsys):
  code = launch.main(argv)
  out, err = capsys.readouterr()
  return code, out, err


def test_metrics_prints_the_table_and_writes_metrics_json_and_plots(tmp_path, capsys):
  npz = write_embeddings(tmp_path / "emb.npz")
  code, out, _ = run(["metrics", "--embeddings", npz, "--bootstrap", "20", "--chance",
                      "--plots", str(tmp_path / "plots")], capsys)
  assert code == 0
  lines = out.splitlines()
  assert lines[0].split()[1:] == ["R@1", "R@5", "R@10", "MdR", "MnR"]
  assert [line.split()[0] for line in lines[1:4]] == ["t2i", "i2t", "chance"]
  assert any(line.startswith("atelectasis") for line in lines)
  data = json.load(open(tmp_path / "metrics.json"))
  assert set(data["t2i"]) == {"R@1", "R@5", "R@10", "MdR", "MnR"} and data["n"] == 40
  assert data["ci"]["samples"] == 20
  assert data["keywords"]["atelectasis"]["n_relevant"] == 20
  assert data["keywords"]["atelectasis"]["P@50"] is None           # K > N
  for name in ("rank_histogram.png", "recall_at_k.png"):
    assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_json_output_goes_to_stdout_and_the_chosen_file(tmp_path, capsys):
  npz = write_embeddings(tmp_path / "emb.npz")
  out_path = tmp_path / "out" / "m.json"
  code, out, err = run(["metrics", "--embeddings", npz, "--bootstrap", "0", "--json",
                        "--output", str(out_path)], capsys)
  assert code == 0 and "ci" not in json.loads(out)
  assert json.loads(out) == json.load(open(out_path))
  assert str(out_path) in err


@pytest.mark.parametrize("make_input,message", [
    (lambda p: str(p / "absent.npz"), "no such file"),
    (lambda p: write_embeddings(p / "short.npz", text_embeddings=np.zeros((39, 8))),
     "'text_embeddings': has 39 rows, expected 40"),
    (lambda p: write_embeddings(p / "nan.npz", image_embeddings=np.full((40, 8), np.nan)),
     "NaN or Inf"),
    (lambda p: write_embeddings(p / "flat.npz", image_embeddings=np.zeros(40)), "2-D"),
])
def test_bad_embedding_files_exit_2_with_a_message_not_a_traceback(tmp_path, capsys, make_input,
                                                                   message):
  code, out, err = run(["metrics", "--embeddings", make_input(tmp_path)], capsys)
  assert code == 2 and out == ""
  assert err.startswith("launch.py metrics: error: ") and message in err
  assert "Traceback" not in err


def test_unwritable_output_and_negative_bootstrap_exit_2(tmp_path, capsys):
  npz = write_embeddings(tmp_path / "emb.npz")
  (tmp_path / "taken").mkdir()
  code, _, err = run(["metrics", "--embeddings", npz, "--output", str(tmp_path / "taken")], capsys)
  assert code == 2 and "cannot write" in err
  code, _, err = run(["metrics", "--embeddings", npz, "--bootstrap", "-1"], capsys)
  assert code == 2 and "--bootstrap" in err


def test_missing_embeddings_flag_is_a_usage_error():
  with pytest.raises(SystemExit) as exit_info:
    launch.main(["metrics"])
  assert exit_info.value.code == 2


def with_ctrate_labels(n=120, d=8, seed=1):
  """An npz as another system would write it for CT-RATE: labels, names and prompt embeddings,
  images leaning towards their positive labels' prompts."""
  rng = np.random.default_rng(seed)
  names = np.array(["Emphysema", "Lung nodule", "Pleural effusion"])
  labels = (rng.random((n, 3)) < 0.3).astype(np.int8)
  prompts = rng.normal(size=(3, 2, d)).astype(np.float32)
  image = (labels @ (prompts[:, 0] - prompts[:, 1]) + rng.normal(size=(n, d))).astype(np.float32)
  return dict(image_embeddings=image,
              text_embeddings=image + 0.3 * rng.normal(size=(n, d)).astype(np.float32),
              study_ids=np.array([f"valid_{i}_a_1" for i in range(n)]), labels=labels,
              label_names=names, prompt_embeddings=prompts, logit_scale=np.float32(10.0))


def test_any_systems_npz_gets_a_zeroshot_section_under_the_ctrate_protocol(tmp_path, capsys):
  npz = tmp_path / "other.npz"
  np.savez(npz, **with_ctrate_labels())
  code, out, _ = run(["metrics", "--embeddings", str(npz), "--bootstrap", "50", "--config",
                      "configs/eval_ctrate.py", "--output_dir", str(tmp_path / "out"), "--plots"],
                     capsys)
  assert code == 0
  data = json.load(open(tmp_path / "out" / "metrics.json"))
  assert list(data["t2i"]) == ["R@5", "R@10", "R@50", "R@100", "MdR", "MnR"]
  assert data["gallery"] == {"unit": "volume", "size": 120, "merged": False}
  section = data["zeroshot"]
  assert section["labels"] == ["Emphysema", "Lung nodule", "Pleural effusion"]
  for name in section["labels"]:
    assert 0.5 < section[name]["AUROC"] <= 1.0 and section[name]["ci"]["AUROC"][0] > 0.5
    assert set(section[name]) >= {"AUROC", "AUPRC", "F1", "accuracy", "sensitivity",
                                  "specificity", "threshold", "n_positive", "prevalence"}
  assert "evaluated split itself" in section["threshold_source"]    # no validation thresholds
  assert data["volume_retrieval"]["gallery"] == "with_findings"
  assert data["volume_retrieval"]["exclude_self"] is False
  assert "zero-shot on N=120" in out and "Lung nodule" in out
  assert (tmp_path / "out" / "roc_lung_nodule.png").read_bytes()[:4] == b"\x89PNG"


def test_labels_without_prompt_embeddings_skip_zeroshot_with_the_reason(tmp_path, capsys):
  fields = with_ctrate_labels()
  del fields["prompt_embeddings"]
  npz = tmp_path / "labels_only.npz"
  np.savez(npz, **fields)
  assert run(["metrics", "--embeddings", str(npz), "--bootstrap", "0"], capsys)[0] == 0
  data = json.load(open(tmp_path / "metrics.json"))
  assert data["zeroshot"] == {"skipped": "no prompt_embeddings in the embedding set"}
  assert data["volume_retrieval"]["n_queries"] > 0


def test_metrics_on_a_cpu_never_imports_jax(tmp_path):
  """Without an accelerator every section (ranks, keyword P@K, volume -> volume, zero-shot, CIs) is
  computed on the host: the command does not pay JAX's import (a large part of its start-up)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  npz = write_embeddings(tmp_path / "emb.npz",
                         labels=(rng.random((40, 2)) < 0.5).astype(np.int8),
                         label_names=np.array(["effusion", "nodule"]),
                         prompt_embeddings=rng.normal(size=(2, 2, 8)).astype(np.float32))
  script = ("import sys, launch\n"
            f"code = launch.main(['metrics', '--embeddings', {npz!r}, '--bootstrap', '20'])\n"
            "assert code == 0, code\n"
            "assert 'jax' not in sys.modules, 'jax was imported'\n")
  done = subprocess.run([sys.executable, "-c", script], cwd=launch.HERE, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  data = json.load(open(tmp_path / "metrics.json"))
  assert data["n"] == 40 and data["volume_retrieval"]["n_queries"] > 0
  assert set(data["zeroshot"]["labels"]) == {"effusion", "nodule"}
