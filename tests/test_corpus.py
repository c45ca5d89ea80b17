"""CSV reading, volume matching, row checks and split assignment."""

import os

import pandas as pd
import pytest

from configs import default
from data_prep import corpus
from data_prep import corpus_base
from data_prep import corpus_bimcv


def data_config(root, **overrides):
  config = default.get_config().data
  config.data_root = str(root)
  for key, value in overrides.items():
    config[key] = value
  return config


def make_corpus(root, rows, folders=("CT1", "CT2", "CT3"), csv_name="curated_ct_report_path_En.csv",
                files=None, encoding="utf-8"):
  """Folders with empty volume files (matching only looks at names) and a CSV of `rows`."""
  for folder in folders:
    os.makedirs(root / folder / "ct", exist_ok=True)
  for relative in files or []:
    (root / relative).write_bytes(b"x")
  os.makedirs(root / "meta", exist_ok=True)
  text = pd.DataFrame(rows).to_csv(index=False)
  (root / "meta" / csv_name).write_bytes(text.encode(encoding))


@pytest.mark.parametrize("n", list(range(1, 41)) + [97, 1000, 8069])
def test_rows_split_matches_the_released_code_slicing(n):
  data = pd.DataFrame({"i": range(n)})
  split_rate = 0.7    # main_ddp.BIMCVRDataset, verbatim
  expected = {
      "train": data[:int(len(data) * split_rate)]["i"].tolist(),
      "val": data[int(len(data) * split_rate):int(len(data) * (split_rate + 0.1))]["i"].tolist(),
      "test": data[int(len(data) * (split_rate + 0.1)):]["i"].tolist(),
  }
  ours = {s: [i for i in range(n) if corpus_bimcv.row_split(i, n) == s] for s in expected}
  assert ours == expected


def test_rows_split_of_ten_rows_has_an_empty_val_as_in_the_released_code():
  assert [corpus_bimcv.row_split(i, 10) for i in range(10)] == ["train"] * 7 + ["test"] * 3


def test_folders_split_is_7_1_2_in_natural_folder_order():
  folders = sorted([f"CT{i}" for i in range(1, 11)], key=corpus_base.natural_key)
  assert folders[-1] == "CT10"
  assert corpus_bimcv.folder_split_assignment(folders) == {
      "train": [f"CT{i}" for i in range(1, 8)], "val": ["CT8"], "test": ["CT9", "CT10"]}


def test_folders_split_needs_three_folders():
  assert corpus_bimcv.folder_split_assignment(["CT1", "CT2", "CT3"]) == {
      "train": ["CT1"], "val": ["CT2"], "test": ["CT3"]}
  with pytest.raises(corpus_base.CorpusError, match="--split_by rows"):
    corpus_bimcv.folder_split_assignment(["CT1", "CT2"])


def test_rows_match_volumes_by_basename_and_get_their_folder_split(tmp_path):
  files = ["CT1/ct/a.nii.gz", "CT2/ct/b.nii.gz", "CT3/ct/c.nii"]
  make_corpus(tmp_path, {"path": ["/elsewhere/CT9/ct/a.nii.gz", "CT2/ct/b.nii.gz", "c.nii"],
                         "Report_en": ["r a", "r b", "r c"], "findings": ["x", "", "y"]},
              files=files)
  result = corpus.read_corpus(data_config(tmp_path))
  assert [(s.study_id, s.source_path, s.split, s.labels) for s in result.studies] == [
      ("a", "CT1/ct/a.nii.gz", "train", {"findings": "x"}),
      ("b", "CT2/ct/b.nii.gz", "val", {"findings": ""}),
      ("c", "CT3/ct/c.nii", "test", {"findings": "y"})]
  assert result.skipped == [] and result.label_columns == ("findings",)


def test_reading_twice_gives_the_same_studies_and_splits(tmp_path):
  files = [f"CT{1 + i % 3}/ct/s{i}.nii.gz" for i in range(12)]
  make_corpus(tmp_path, {"path": [os.path.basename(f) for f in files[::-1]],
                         "Report_en": [f"report {i}" for i in range(12)]}, files=files)
  for split_by in ("folders", "rows"):
    first = corpus.read_corpus(data_config(tmp_path, split_by=split_by))
    second = corpus.read_corpus(data_config(tmp_path, split_by=split_by))
    assert first.studies == second.studies


def test_an_exact_relative_path_wins_over_another_folder_with_the_same_name(tmp_path):
  make_corpus(tmp_path, {"path": ["CT3/ct/same.nii.gz"], "Report_en": ["r"]},
              files=["CT1/ct/same.nii.gz", "CT3/ct/same.nii.gz"])
  (study,) = corpus.read_corpus(data_config(tmp_path)).studies
  assert study.source_path == "CT3/ct/same.nii.gz"


def test_bad_rows_are_skipped_with_the_reason(tmp_path):
  files = ["CT1/ct/ok.nii.gz", "CT1/ct/dup.nii.gz", "CT2/ct/empty.nii.gz"]
  make_corpus(tmp_path, {
      "path": ["ok.nii.gz", "../../etc/passwd.nii.gz", "CT1/../../x/ok.nii.gz", "missing.nii.gz",
               "empty.nii.gz", "dup.nii.gz", "CT1/ct/dup.nii.gz", ""],
      "Report_en": ["fine", "r", "r", "r", "   ", "first", "second", "r"]}, files=files)
  result = corpus.read_corpus(data_config(tmp_path))
  assert [s.study_id for s in result.studies] == ["ok", "dup"]
  reasons = {s.row: s.reason for s in result.skipped}
  assert "escapes data_root" in reasons[2] and "escapes data_root" in reasons[3]
  assert "no volume file named 'missing.nii.gz'" in reasons[4]
  assert "empty report" in reasons[5]
  assert "duplicate study 'dup': row 6" in reasons[7]
  assert reasons[8] == "empty path"


def test_a_symlink_out_of_data_root_is_refused(tmp_path):
  root = tmp_path / "root"
  (tmp_path / "secret.nii.gz").write_bytes(b"x")
  make_corpus(root, {"path": ["secret.nii.gz"], "Report_en": ["r"]})
  os.symlink(tmp_path / "secret.nii.gz", root / "CT1" / "ct" / "secret.nii.gz")
  (skipped,) = corpus.read_corpus(data_config(root)).skipped
  assert "resolves outside data_root" in skipped.reason


def test_non_utf8_rows_are_skipped_and_the_others_kept(tmp_path):
  make_corpus(tmp_path, {"path": ["a.nii.gz", "b.nii.gz"],
                         "Report_en": ["Derrame pleural pequeño", "plain ascii"]},
              files=["CT1/ct/a.nii.gz", "CT1/ct/b.nii.gz"], encoding="cp1252")
  result = corpus.read_corpus(data_config(tmp_path))
  assert [s.study_id for s in result.studies] == ["b"]
  (skipped,) = result.skipped
  assert "column 'Report_en' is not valid utf-8 (byte 0xF1" in skipped.reason
  recoded = corpus.read_corpus(data_config(tmp_path, csv_encoding="cp1252"))
  assert recoded.studies[0].report == "Derrame pleural pequeño"


def test_utf8_with_bom_and_utf16_csvs_are_read(tmp_path):
  rows = {"path": ["a.nii.gz"], "Report_en": ["Ünïcode ok"]}
  for encoding in ("utf-8-sig", "utf-16"):
    make_corpus(tmp_path, rows, files=["CT1/ct/a.nii.gz"], encoding=encoding)
    (study,) = corpus.read_corpus(data_config(tmp_path)).studies
    assert study.report == "Ünïcode ok"


def test_the_public_bimcv_r_csv_is_found_when_the_curated_one_is_absent(tmp_path):
  make_corpus(tmp_path, {"path": ["a.nii.gz"], "Report_en": ["r"]}, csv_name="BIMCV-R.csv",
              files=["CT1/ct/a.nii.gz"])
  result = corpus.read_corpus(data_config(tmp_path))
  assert os.path.basename(result.csv_path) == "BIMCV-R.csv" and len(result.studies) == 1


def test_column_names_are_configurable(tmp_path):
  make_corpus(tmp_path, {"file": ["a.nii.gz"], "text": ["r"], "diagnosis": ["d"]},
              files=["CT1/ct/a.nii.gz"])
  result = corpus.read_corpus(data_config(tmp_path, path_column="file", report_column="text",
                                          label_columns=("diagnosis", "absent")))
  assert result.studies[0].labels == {"diagnosis": "d"}


@pytest.mark.parametrize("setup,message", [
    ("no_root", "is not a directory"),
    ("no_csv", "no CSV in"),
    ("no_column", "has no column 'Report_en'"),
    ("no_folders", "no CT*/ct/ folders"),
])
def test_unusable_corpora_are_one_clear_error(tmp_path, setup, message):
  root = tmp_path / "root"
  if setup != "no_root":
    make_corpus(root, {"path": ["a.nii.gz"], "Report_en": ["r"]},
                folders=() if setup == "no_folders" else ("CT1", "CT2", "CT3"))
  if setup == "no_csv":
    os.remove(root / "meta" / "curated_ct_report_path_En.csv")
  if setup == "no_column":
    make_corpus(root, {"path": ["a.nii.gz"], "report": ["r"]})
  with pytest.raises(corpus_base.CorpusError, match=message.replace("*", r"\*")):
    corpus.read_corpus(data_config(root))


# --- Every CSV line accounted for -----------------------------------------------------------------

def write_csv_lines(root, lines, files):
  """A corpus whose CSV is exactly `lines` (the header first), with empty volume files."""
  make_corpus(root, {"path": [], "Report_en": []}, files=files)
  (root / "meta" / "curated_ct_report_path_En.csv").write_text("\n".join(lines) + "\n")


def twenty_rows(quoted=True):
  files = [f"CT{1 + i % 3}/ct/s{i}.nii.gz" for i in range(20)]
  report = '"report {i}, normal"' if quoted else "report {i} normal"
  return files, ["path,Report_en,findings"] + [f"{f},{report.format(i=i)},x" for i, f in
                                               enumerate(files)]


@pytest.mark.parametrize("case", ["stray_quote", "unclosed_quote", "swallow_closed_later"])
def test_a_bad_quote_skips_its_line_and_the_following_rows_are_read(tmp_path, case):
  files, lines = twenty_rows(quoted=case != "swallow_closed_later")
  if case == "stray_quote":           # csv error on the line itself
    lines[7] = 'CT2/ct/s6.nii.gz,"report 6 with a "stray" quote",x'
  elif case == "unclosed_quote":      # the field runs into the next line, then fails
    lines[7] = 'CT2/ct/s6.nii.gz,"report 6 never closed,x'
  else:                               # parses cleanly as one record of 15 lines
    lines[7] = 'CT2/ct/s6.nii.gz,"report 6 never closed,x'
    lines.append('CT2/ct/s20.nii.gz,report 20",x')
    files.append("CT2/ct/s20.nii.gz")
  write_csv_lines(tmp_path, lines, files)
  result = corpus.read_corpus(data_config(tmp_path))
  assert result.num_rows == len(lines) - 1 == len(result.studies) + len(result.skipped)
  (skipped,) = [s for s in result.skipped if s.row == 7]
  assert skipped.reason.startswith("line 8: ") and "fix the quoting" in skipped.reason
  assert "unbalanced quote" in skipped.reason or case == "stray_quote"
  assert ("swallows the next lines (line 9 and on are rows of their own)" in skipped.reason) == (
      case == "swallow_closed_later")
  assert skipped.path == "CT2/ct/s6.nii.gz"
  reports = {s.study_id: s.report for s in result.studies}
  assert reports["s7"] == "report 7, normal" if case != "swallow_closed_later" else \
      reports["s7"] == "report 7 normal"
  assert len(reports) == len(lines) - 1 - len(result.skipped)


def test_quoted_multi_line_reports_are_one_row(tmp_path):
  files = ["CT1/ct/a.nii.gz", "CT2/ct/b.nii.gz", "CT3/ct/c.nii.gz"]
  text = ('path,Report_en,findings\r\n'
          'CT1/ct/a.nii.gz,"Findings:\r\n- nodule, 4 mm, ""stable""\r\n\r\nImpression: benign",x\r\n'
          'CT2/ct/b.nii.gz,"one line",y\r\n'
          'CT3/ct/c.nii.gz,"ends with a line\nthat has, commas, too",z\r\n')
  make_corpus(tmp_path, {"path": [], "Report_en": []}, files=files)
  (tmp_path / "meta" / "curated_ct_report_path_En.csv").write_bytes(text.encode())
  result = corpus.read_corpus(data_config(tmp_path))
  assert result.skipped == [] and result.num_rows == 3
  assert [s.report for s in result.studies] == [
      'Findings:\r\n- nodule, 4 mm, "stable"\r\n\r\nImpression: benign', "one line",
      "ends with a line\nthat has, commas, too"]


def test_records_with_the_wrong_field_count_are_skipped_with_their_line(tmp_path):
  files, lines = twenty_rows()
  lines[3] = 'CT3/ct/s2.nii.gz,"report 2"'
  lines[5] = 'CT2/ct/s4.nii.gz,"report 4",x,extra'
  lines.insert(9, "")                   # a blank line is not a row
  write_csv_lines(tmp_path, lines, files)
  result = corpus.read_corpus(data_config(tmp_path))
  assert result.num_rows == 20 and len(result.studies) == 18
  assert [(s.row, s.path, s.reason) for s in result.skipped] == [
      (3, "CT3/ct/s2.nii.gz", "line 4: 2 fields, the header has 3 (path, Report_en, findings); "
                              "fix the row"),
      (5, "CT2/ct/s4.nii.gz", "line 6: 4 fields, the header has 3 (path, Report_en, findings); "
                              "fix the row")]


def test_long_reports_are_read_and_absurd_fields_are_skipped(tmp_path):
  files = ["CT1/ct/a.nii.gz", "CT2/ct/b.nii.gz", "CT3/ct/c.nii.gz"]
  long, absurd = "x" * 200_000, "y" * 1_000_001      # csv's default limit is 131072
  make_corpus(tmp_path, {"path": ["a.nii.gz", "b.nii.gz", "c.nii.gz"],
                         "Report_en": [long, absurd, "short"]}, files=files)
  result = corpus.read_corpus(data_config(tmp_path))
  assert [(s.study_id, len(s.report)) for s in result.studies] == [("a", 200_000), ("c", 5)]
  (skipped,) = result.skipped
  assert skipped.row == 2 and skipped.path == "b.nii.gz"
  assert skipped.reason == ("line 3: column 'Report_en' holds 1000001 characters, over "
                            "data.max_field_chars=1000000; raise --config.data.max_field_chars "
                            "to keep the row")
  lower = corpus.read_corpus(data_config(tmp_path, max_field_chars=10))
  assert [s.study_id for s in lower.studies] == ["c"] and lower.num_rows == 3


@pytest.mark.timeout(30)
def test_special_files_named_like_volumes_are_refused(tmp_path):
  make_corpus(tmp_path, {"path": ["pipe.nii.gz", "dir.nii.gz", "dangling.nii.gz", "twice.nii.gz"],
                         "Report_en": ["r"] * 4}, files=["CT2/ct/twice.nii.gz"])
  os.mkfifo(tmp_path / "CT1" / "ct" / "pipe.nii.gz")
  os.mkdir(tmp_path / "CT1" / "ct" / "dir.nii.gz")
  os.symlink(tmp_path / "nowhere.nii.gz", tmp_path / "CT1" / "ct" / "dangling.nii.gz")
  os.mkfifo(tmp_path / "CT1" / "ct" / "twice.nii.gz")   # a regular file of that name wins
  result = corpus.read_corpus(data_config(tmp_path))
  assert [s.source_path for s in result.studies] == ["CT2/ct/twice.nii.gz"]
  assert [s.reason for s in result.skipped] == [
      "CT1/ct/pipe.nii.gz is a named pipe (FIFO), not a regular file; refused",
      "CT1/ct/dir.nii.gz is a directory, not a regular file; refused",
      "CT1/ct/dangling.nii.gz is missing (a broken symbolic link?), not a regular file; refused"]


def test_an_undecodable_path_is_reported_as_text_a_report_file_can_hold(tmp_path):
  make_corpus(tmp_path, {"path": ["caf\xe9.nii.gz"], "Report_en": ["r"]}, encoding="latin-1")
  (skipped,) = corpus.read_corpus(data_config(tmp_path)).skipped
  assert skipped.path == "caf\ufffd.nii.gz" and "byte 0xE9" in skipped.reason
  skipped.path.encode("utf-8")
