"""`launch.py embed` (index of a converted split or of a folder of NIfTI files) and `launch.py
search` (text, keyword or volume queries), with a constructed model whose image and report
embeddings coincide on the test split (model_files.align_image_projection): a study's own report,
or its own CT volume, must find it at rank 1.
"""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

import launch
import model_files
from conftest import TINY_CONFIG
from data_prep import corpus_base
from medfinder_jax import findings
from medfinder_jax import index as index_lib
from medfinder_jax.commands import embed
from medfinder_jax.commands import search as search_command
from model_files import run_launch as run
from multiprocess import launch_processes


CONFIG = ["--config", TINY_CONFIG, "--config.model.fusion.enabled=false"]


@pytest.fixture(scope="module")
def split_index(aligned, tmp_path_factory):
  """Index of the test split built by `launch.py embed` with the released-code checkpoint."""
  index = str(tmp_path_factory.mktemp("split_index") / "index")
  code = launch.main(["embed", "--model_path", aligned.released_path, "--split", "test",
                      "--tfrecord_dir", aligned.dataset_dir, "--index", index, *CONFIG])
  assert code == 0
  return index


def search(index, capsys, *query):
  code, out, err = run(["search", "--index", index, *query, "--json", *CONFIG], capsys)
  assert code == 0, err
  return json.loads(out)


def volume_path(aligned, row):
  return os.path.join(aligned.raw_dir, aligned.source_paths[row])


def test_embed_records_the_model_and_the_gallery_preprocessing(aligned, split_index):
  meta = json.load(open(os.path.join(split_index, "index.json")))
  assert index_lib.load_index(split_index).n == 8 and meta["model"]["kind"] == "released"
  assert meta["model"]["checkpoint"] == os.path.abspath(aligned.released_path)
  assert meta["model"]["embedded_from"] == {"dataset": os.path.abspath(aligned.dataset_dir),
                                            "split": "test"}
  dataset_meta = json.load(open(os.path.join(aligned.dataset_dir, "metadata.json")))
  assert meta["model"]["preprocess"] == dataset_meta["preprocess"]
  stored = index_lib.load_index(split_index)
  assert list(stored.study_ids) == aligned.study_ids
  assert list(stored.source_paths) == aligned.source_paths
  assert all(stored.thumbnail(r).startswith(b"\x89PNG") for r in range(stored.n))


@pytest.mark.parametrize("row", [0, 5])
def test_a_studys_report_finds_that_study_at_rank_1(aligned, split_index, capsys, row):
  result = search(split_index, capsys, "--text", aligned.reports[row])
  assert result["ranked"] == "studies" and len(result["results"]) == 8
  assert result["results"][0]["study_id"] == aligned.study_ids[row]
  assert result["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)   # float16 storage


def test_a_studys_ct_volume_finds_its_report_at_rank_1(aligned, split_index, capsys):
  result = search(split_index, capsys, "--volume", volume_path(aligned, 2), "--top_k", "3")
  assert result["ranked"] == "reports" and len(result["results"]) == 3
  top = result["results"][0]
  assert top["study_id"] == aligned.study_ids[2] and top["report"] == aligned.reports[2]
  assert [r["rank"] for r in result["results"]] == [1, 2, 3]


def test_keyword_results_say_which_reports_state_the_finding(aligned, split_index, capsys):
  result = search(split_index, capsys, "--keyword", "atelectasis")
  relevance = dict(zip(aligned.study_ids, findings.keyword_relevance(aligned.reports,
                                                                     "atelectasis")))
  assert [r["states_finding"] for r in result["results"]] == [
      bool(relevance[r["study_id"]]) for r in result["results"]]
  assert result["relevant_in_index"] == sum(relevance.values())
  scores = [r["score"] for r in result["results"]]
  assert scores == sorted(scores, reverse=True)


def test_text_output_is_a_ranked_table(aligned, split_index, capsys):
  code, out, _ = run(["search", "--index", split_index, "--keyword", "atelectasis", "--top_k",
                      "4", *CONFIG], capsys)
  lines = out.splitlines()
  assert code == 0 and lines[0].startswith("keyword query 'atelectasis': top 4 of 8 studies")
  assert lines[1].split()[:4] == ["rank", "study_id", "score", "finding"]
  assert [line.split()[0] for line in lines[2:6]] == ["1", "2", "3", "4"]
  assert lines[6].endswith("studies in the index do)")


def stored_fields(directory):
  """{name: array} of an index's live studies, as embeddings.npz would hold them."""
  index = index_lib.load_index(directory)
  return {"image_embeddings": index.image_embeddings, "text_embeddings": index.text_embeddings,
          "study_ids": index.study_ids, "reports": index.reports,
          "source_paths": index.source_paths}


def write_volume_folder(aligned, folder):
  """The test split's NIfTI files (4 of them in a subfolder), one report beside its volume,
  a file that is not gzip and a 2D image."""
  for row, source in enumerate(aligned.source_paths):
    target = folder / ("nested" if row % 2 else "") / os.path.basename(source)
    target.parent.mkdir(exist_ok=True)
    shutil.copy(os.path.join(aligned.raw_dir, source), target)
  (folder / os.path.basename(aligned.source_paths[0]).replace(".nii.gz", ".txt")).write_text(
      aligned.reports[0])
  (folder / "broken.nii.gz").write_bytes(b"not a volume")
  nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), str(folder / "flat.nii.gz"))


def test_embed_of_a_nifti_folder_matches_the_converted_split(aligned, split_index, tmp_path,
                                                            capsys):
  folder = tmp_path / "volumes"
  folder.mkdir()
  write_volume_folder(aligned, folder)
  index = str(tmp_path / "index")
  code, out, err = run(["embed", "--model_path", aligned.released_path, "--volumes", str(folder),
                        "--index", index, f"--config.data.tfrecord_dir={aligned.dataset_dir}",
                        *CONFIG], capsys)
  assert code == 0, err
  assert "8 studies (2 unreadable files skipped)" in out
  assert "skipped broken.nii.gz: not a valid gzip file" in err
  assert "skipped flat.nii.gz: expected a 3D volume" in err
  got = stored_fields(index)
  want = stored_fields(split_index)
  rows = {os.path.basename(i): r for r, i in enumerate(got["study_ids"])}
  order = [rows[i] for i in want["study_ids"]]
  np.testing.assert_allclose(got["image_embeddings"][order], want["image_embeddings"],
                             rtol=1e-4, atol=1e-5)
  assert got["study_ids"][order[1]] == "nested/" + aligned.study_ids[1]
  assert got["reports"][order[0]] == aligned.reports[0]
  assert [r for r in got["reports"] if r] == [aligned.reports[0]]     # only one .txt
  result = search(index, capsys, "--volume", volume_path(aligned, 3))  # only one report to rank
  assert [r["study_id"] for r in result["results"]] == [aligned.study_ids[0]]


@pytest.mark.slow
def test_two_processes_embed_a_nifti_folder_like_one(aligned, tmp_path, capsys):
  folder = tmp_path / "volumes"
  folder.mkdir()
  write_volume_folder(aligned, folder)
  (folder / "nested" / "zz.nii.gz").write_bytes(b"")    # row 6 of 11: read by process 1
  argv = ["embed", "--model_path", aligned.released_path, "--volumes", str(folder),
          f"--config.data.tfrecord_dir={aligned.dataset_dir}", *CONFIG]
  assert run(argv + ["--index", str(tmp_path / "one")], capsys)[0] == 0
  # 11 files, 2 processes x 4 devices x 1 per device: each process reads 4 rows of 8 per batch.
  results = launch_processes(argv + ["--index", str(tmp_path / "two")], num_processes=2,
                             devices_per_process=4, timeout=300)
  for code, _, err in results:
    assert code == 0, err[-3000:]
  report = results[0][2]                                # process 0 reports every skipped file
  assert "skipped broken.nii.gz: not a valid gzip file" in report
  assert "skipped flat.nii.gz: expected a 3D volume" in report
  assert "skipped nested/zz.nii.gz: " in report and "3 unreadable files" in results[0][1]
  one = stored_fields(str(tmp_path / "one"))
  two = stored_fields(str(tmp_path / "two"))
  assert list(two["study_ids"]) == list(one["study_ids"])
  np.testing.assert_allclose(two["image_embeddings"], one["image_embeddings"], rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(two["text_embeddings"], one["text_embeddings"], rtol=1e-4, atol=1e-5)


def test_index_of_our_checkpoint_searches_with_it(aligned, tmp_path, capsys):
  index = str(tmp_path / "index")
  assert run(["embed", "--model_path", aligned.run_dir, "--split", "test", "--index", index],
             capsys)[0] == 0                # the checkpoint's config and dataset
  result = search(index, capsys, "--text", aligned.reports[4])
  assert result["model"]["kind"] == "checkpoint" and result["model"]["step"] == 7
  assert result["results"][0]["study_id"] == aligned.study_ids[4]


def another_model_file(aligned, path):
  variables = {**aligned.variables, "params": {**aligned.variables["params"]}}
  projection = aligned.variables["params"]["text_projection"]
  variables["params"]["text_projection"] = {**projection, "bias": projection["bias"] + 0.5}
  return model_files.write_released_checkpoint(path, variables)


@pytest.mark.parametrize("case,message", [
    ("flat_volume", "expected a 3D volume, found a 2D array"),
    ("missing_volume", "no such volume file"),
    ("other_model", "index built by another model (fingerprint differ)"),
    ("missing_index", "no such index directory"),
    ("checkpoint_gone", "which no longer exists; pass --model_path"),
    ("empty_text", "--text: empty query"),
    ("zero_top_k", "--top_k must be at least 1"),
])
def test_search_user_mistakes_exit_2_without_a_traceback(aligned, split_index, tmp_path, capsys,
                                                        case, message):
  flat = tmp_path / "flat.nii.gz"
  nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), str(flat))
  if case == "checkpoint_gone":
    moved = shutil.copy(aligned.released_path, str(tmp_path / "moved.pt"))
    index = str(tmp_path / "index")
    assert launch.main(["embed", "--model_path", moved, "--split", "test", "--tfrecord_dir",
                        aligned.dataset_dir, "--index", index, *CONFIG]) == 0
    os.remove(moved)
    capsys.readouterr()
  else:
    index = str(tmp_path / "absent") if case == "missing_index" else split_index
  query = {"flat_volume": ["--volume", str(flat)],
           "missing_volume": ["--volume", str(tmp_path / "absent.nii.gz")],
           "other_model": ["--text", "effusion", "--model_path",
                           another_model_file(aligned, tmp_path / "other.pt")],
           "empty_text": ["--text", "  "],
           "zero_top_k": ["--text", "effusion", "--top_k", "0"]}.get(case, ["--text", "nodule"])
  code, out, err = run(["search", "--index", index, *query, *CONFIG], capsys)
  assert code == 2 and out == ""
  assert err.startswith("launch.py search: error: ") and message in err
  assert "Traceback" not in err


def test_embed_never_replaces_an_index_without_overwrite(aligned, split_index, capsys):
  code, _, err = run(["embed", "--model_path", aligned.released_path, "--split", "test",
                      "--tfrecord_dir", aligned.dataset_dir, "--index", split_index, *CONFIG],
                     capsys)
  assert code == 2 and "already exists; pass --append" in err


def test_embed_into_a_folder_that_is_no_index_fails_before_loading_the_model(
    aligned, tmp_path, capsys, monkeypatch):
  from medfinder_jax import loading  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "scan.nii.gz").write_bytes(b"keep me")
  code, _, err = run(["embed", "--model_path", aligned.released_path, "--split", "test",
                      "--tfrecord_dir", aligned.dataset_dir, "--index", str(tmp_path / "data"),
                      "--overwrite", *CONFIG], capsys)
  assert code == 2 and "exists and is not an index" in err and "Traceback" not in err
  assert (tmp_path / "data" / "scan.nii.gz").read_bytes() == b"keep me"


def test_embed_of_a_folder_without_volumes_exits_2(aligned, tmp_path, capsys):
  code, _, err = run(["embed", "--model_path", aligned.released_path, "--volumes", str(tmp_path),
                      "--index", str(tmp_path / "index"), *CONFIG], capsys)
  assert code == 2 and "no .nii or .nii.gz files" in err and "Traceback" not in err


# --- Building blocks -----------------------------------------------------------------------------

def test_volume_folders_list_nifti_files_naturally_with_ids_and_reports(tmp_path):
  for name in ("a10.nii.gz", "a2.nii.gz", "sub/b.nii", "a2.txt", "notes.md"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text("Small left effusion.\n" if name.endswith(".txt") else "x")
  files = embed.list_volume_files(str(tmp_path))
  assert files == ["a2.nii.gz", "a10.nii.gz", "sub/b.nii"]
  assert [corpus_base.study_id_of(f) for f in files] == ["a2", "a10", "sub/b"]
  assert embed.read_report_beside(str(tmp_path / "a2.nii.gz")) == "Small left effusion."
  assert embed.read_report_beside(str(tmp_path / "a10.nii.gz")) == ""


def small_index(tmp_path, reports):
  rng = np.random.default_rng(0)
  n = len(reports)
  embeddings = {"image_embeddings": rng.normal(size=(n, 4)).astype(np.float32),
                "text_embeddings": rng.normal(size=(n, 4)).astype(np.float32),
                "study_ids": np.array([f"s{i}" for i in range(n)]),
                "reports": np.array(reports)}
  index_lib.build_index(str(tmp_path / "index"), embeddings, {"fingerprint": "f"})
  return index_lib.load_index(str(tmp_path / "index")), embeddings


def test_volume_queries_rank_only_studies_that_have_a_report(tmp_path):
  index, embeddings = small_index(tmp_path, ["r0", "", "r2", "", "r4", "r5"])
  query = embeddings["text_embeddings"][1]          # best match: s1, which has no report
  results = search_command.search_embedding(index, query, "volume", top_k=3)
  assert [r.rank for r in results] == [1, 2, 3]
  assert all(index.reports[r.row] for r in results)
  text = index.text_embeddings / np.linalg.norm(index.text_embeddings, axis=1, keepdims=True)
  scores = text @ (query / np.linalg.norm(query))
  expected = [i for i in np.argsort(-scores) if index.reports[i]][:3]
  assert [r.row for r in results] == expected


def test_volume_queries_need_reports(tmp_path):
  index, embeddings = small_index(tmp_path, ["", ""])
  with pytest.raises(search_command.SearchError, match="no reports to rank"):
    search_command.search_embedding(index, embeddings["image_embeddings"][0], "volume", top_k=1)


@pytest.mark.slow
def test_a_full_disk_stops_embed_with_a_message_and_keeps_the_old_index(aligned, tmp_path):
  from small_disk import launch as command, read, run_on_small_disk  # pylint: disable=import-outside-toplevel
  embed = command("embed", "--model_path", aligned.released_path, "--split", "test",
                  "--tfrecord_dir", aligned.dataset_dir, "--index", "$SMALL/index", *CONFIG)
  script = (f"{embed} > /dev/null 2> $WORK/first || exit 3; "
            f"dd if=/dev/zero of=$SMALL/filler bs=4096 2> /dev/null; "
            f"{embed} --overwrite > $WORK/stdout 2> $WORK/stderr; echo $? > $WORK/code")
  code, copy = run_on_small_disk(tmp_path, "4m", script)
  assert code == 0, read(tmp_path, "first")[-2000:]
  err = read(tmp_path, "stderr")
  assert read(tmp_path, "code").strip() == "2" and "Traceback" not in err
  assert "launch.py embed: error: " in err and "No space left on device" in err
  index = index_lib.load_index(os.path.join(copy, "index"))       # the old one, untouched
  assert index.n == 8 and list(index.study_ids) == aligned.study_ids
  assert not [name for name in os.listdir(copy) if name.startswith(".tmp")]   # no debris
