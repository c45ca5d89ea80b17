"""The raw corpus of data.layout: `read_corpus` picks the layout's reader (data.layout; "auto":
`detect_layout`), and every reader gives the same corpus_base.Corpus of Studies, so convert.py is
one converter.

  bimcv, dicom  data_prep/corpus_bimcv.py  (BIMCV-R's CT*/ct/ files, or DICOM folders, and a CSV)
  ctrate        data_prep/corpus_ctrate.py (CT-RATE's dataset/ folder and its CSVs)

The shared types, the CSV reader and the file checks are in data_prep/corpus_base.py.
"""

from data_prep import corpus_base
from data_prep import corpus_bimcv
from data_prep import corpus_ctrate
from data_prep import filesystem


LAYOUTS = ("auto", "bimcv", "ctrate", "dicom")


def detect_layout(data_root):
  """(layout, why): `ctrate` when data_root holds CT-RATE's dataset/ folder (its volumes or its
  report CSVs), else `bimcv` when it holds CT*/ct/ folders, else `dicom` when it has meta/."""
  dataset = filesystem.join(data_root, "dataset")
  for name in ("radiology_text_reports", "train", "valid"):
    if filesystem.isdir(filesystem.join(dataset, name)):
      return "ctrate", f"found dataset/{name}/"
  if corpus_bimcv.ct_folders(data_root):
    return "bimcv", "found CT*/ct/ folders"
  if filesystem.isdir(filesystem.join(data_root, "meta")):
    return "dicom", "found meta/ without CT*/ct/ folders (CSV paths naming DICOM folders)"
  raise corpus_base.CorpusError(
      f"cannot tell the layout of data_root {data_root!r}: no dataset/ folder (CT-RATE), no "
      f"CT*/ct/ folders (BIMCV-R) and no meta/ folder (a CSV of DICOM folders); set --layout")


def read_corpus(data_config, log=None):
  """The Corpus of data.layout (LAYOUTS; "auto" detects it and says which via `log`)."""
  data_root = str(data_config.data_root)
  if not data_root or not filesystem.isdir(data_root):
    raise corpus_base.CorpusError(f"data_root {data_root!r} is not a directory (set --data_root)")
  layout = str(data_config.get("layout", "auto"))
  if layout not in LAYOUTS:
    raise corpus_base.CorpusError(f"data.layout={layout!r}; expected one of {LAYOUTS}")
  if layout == "auto":
    layout, why = detect_layout(data_root)
    if log is not None:
      log(f"layout: {layout} (detected: {why}; set --layout to choose)")
  if layout == "ctrate":
    return corpus_ctrate.read_ctrate(data_config)
  return corpus_bimcv.read_csv_corpus(data_config, layout)
