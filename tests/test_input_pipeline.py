"""Input pipeline: per-process shards, deterministic resumable training stream, padded eval."""

import glob
import hashlib
import itertools
import json
import os
import re
import shutil
import threading
import time

import jax
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import default
from data_prep import convert
from data_prep import corpus_base
from data_prep import phantom_layouts
from data_prep import schema
from medfinder_jax import input_pipeline as ip
from medfinder_jax import sharding
from medfinder_jax import text as text_lib


@pytest.fixture(scope="module")
def builder(tiny_dataset):
  return ip.open_dataset(tiny_dataset)[0]


@pytest.fixture(scope="module")
def tokenizer():
  return text_lib.ReportTokenizer(text_lib.resolve_text_model_path("minilm"), max_tokens=32)


def digest(volume):
  return hashlib.sha1(np.ascontiguousarray(volume).tobytes()).hexdigest()


def split_digests(builder, split):
  """Volume digests of a split in dataset order, read straight through tfds."""
  dataset = builder.as_dataset(split=split, shuffle_files=False)
  return [digest(ex["volume"]) for ex in tfds.as_numpy(dataset)]


def rows(batches, count):
  """Volume digests of the first `count` rows of a batch stream."""
  out = []
  for batch in batches:
    out += [digest(v) for v in batch["volume"]]
    if len(out) >= count:
      return out[:count]
  return out


def train(builder, tokenizer, **kw):
  kw = {"seed": 3, "shuffle_buffer": 8, "process_index": 0, "process_count": 1, **kw}
  return ip.train_batches(builder, "train", 4, tokenizer, **kw)


def test_spec_describes_the_stored_volumes(tiny_dataset):
  _, spec = ip.open_dataset(tiny_dataset)
  assert spec.shape == (16, 16, 8)
  assert spec.volume_dtype == "uint8"
  assert spec.intensity.scale == pytest.approx(1 / 255) and spec.intensity.offset == 0.0
  assert sum(spec.split_sizes.values()) == 40
  assert spec.label_columns == ("findings",)


def test_train_batches_have_fixed_shapes_and_token_ids(builder, tokenizer):
  batch = next(train(builder, tokenizer))
  assert batch["volume"].shape == (4, 16, 16, 8) and batch["volume"].dtype == np.uint8
  assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == np.int32
  assert batch["attention_mask"].shape == (4, 32)
  assert (batch["attention_mask"][:, 0] == 1).all()


def test_each_epoch_visits_every_study_once_in_a_new_order(builder, tokenizer):
  expected = sorted(split_digests(builder, "train"))
  n = len(expected)
  stream = rows(train(builder, tokenizer), 2 * n)
  first, second = stream[:n], stream[n:]
  assert sorted(first) == expected and sorted(second) == expected
  assert first != second


def test_stream_is_a_function_of_the_seed(builder, tokenizer):
  a = rows(train(builder, tokenizer), 20)
  assert a == rows(train(builder, tokenizer), 20)
  assert a != rows(train(builder, tokenizer, seed=4), 20)


@pytest.mark.parametrize("start", [1, 6, 9])  # 28 train studies / 4 = 7 batches per epoch
def test_resumed_stream_continues_where_an_uninterrupted_one_is(builder, tokenizer, start):
  straight = list(itertools.islice(train(builder, tokenizer), start + 4))[start:]
  resumed = list(itertools.islice(train(builder, tokenizer, start_batch=start), 4))
  assert len(straight) == len(resumed) == 4
  for a, b in zip(straight, resumed):
    np.testing.assert_array_equal(a["volume"], b["volume"])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_report_windows_are_drawn_afresh_each_epoch_and_resume_exactly(builder, tokenizer):
  """With windows shorter than the reports (text augmentation), a study's window changes from
  epoch to epoch, and a resumed stream draws the windows the uninterrupted one drew."""
  per_epoch = 7                                  # 28 train studies / 4
  stream = list(itertools.islice(train(builder, tokenizer, window_words=3), 2 * per_epoch))
  windows = {}
  for epoch in (0, 1):
    for batch in stream[epoch * per_epoch:(epoch + 1) * per_epoch]:
      for volume, ids in zip(batch["volume"], batch["input_ids"]):
        windows.setdefault(digest(volume), {})[epoch] = ids.tolist()
  assert len(windows) == 28
  assert sum(w[0] != w[1] for w in windows.values()) >= 14
  resumed = list(itertools.islice(train(builder, tokenizer, window_words=3, start_batch=9), 3))
  for a, b in zip(stream[9:12], resumed):
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def parallel_maps(dataset):
  """The ParallelMapDataset nodes of a tf.data pipeline's graph."""
  graph = tf.compat.v1.GraphDef.FromString(
      dataset._as_serialized_graph().numpy())  # pylint: disable=protected-access
  return [node for node in graph.node if node.op.startswith("ParallelMapDataset")]


def test_the_training_decode_runs_in_parallel_and_keeps_record_order(builder):
  """Decoding runs on tf.data's threads but may not reorder records: the stream must be a
  function of the seed and the resume position alone."""
  dataset = ip.train_records(builder, "train", 4, seed=0, process_index=0, process_count=1)
  (decode,) = parallel_maps(dataset)
  assert decode.attr["deterministic"].s in (b"true", b"default")   # tf.data's default: ordered


def test_processes_read_disjoint_files_covering_the_split(builder, tokenizer):
  files = ip.split_files(builder, "train")
  per_process = [files.for_process(p, 2)[0] for p in range(2)]
  assert not set(per_process[0]) & set(per_process[1])
  assert sorted(per_process[0] + per_process[1]) == sorted(files.paths)
  seen = []
  for p in range(2):
    n = sum(files.for_process(p, 2)[1])
    seen += rows(train(builder, tokenizer, process_index=p, process_count=2), n)
  assert sorted(seen) == sorted(split_digests(builder, "train"))


# (3, 2): shares of 4, 2 and 2 studies, so two processes end with a batch of padding only.
@pytest.mark.parametrize("process_count,local_batch", [(1, 3), (2, 2), (4, 1), (2, 8), (3, 2)])
def test_eval_counts_each_study_once_in_dataset_order(builder, tokenizer, process_count,
                                                      local_batch):
  expected = split_digests(builder, "test")
  streams = [list(ip.eval_batches(builder, "test", local_batch, tokenizer, process_index=p,
                                  process_count=process_count)) for p in range(process_count)]
  files = ip.split_files(builder, "test")
  # The same number of batches on every process (collectives need it), of the same layout.
  assert {len(s) for s in streams} == {ip.num_eval_batches(files, local_batch, process_count)}
  stored = builder.info.features["volume"]
  found = {}
  for stream in streams:
    for batch in stream:
      assert batch["volume"].shape == (local_batch, *stored.shape)
      assert batch["volume"].dtype == stored.np_dtype and batch["index"].dtype == np.int32
      assert (batch["index"][~batch["mask"]] == -1).all()
      assert not batch["volume"][~batch["mask"]].any()
      for index, volume in zip(batch["index"][batch["mask"]], batch["volume"][batch["mask"]]):
        assert index not in found
        found[int(index)] = digest(volume)
  assert [found[i] for i in range(len(expected))] == expected


def test_eval_reads_this_process_share_by_default(builder, tokenizer):
  default = list(ip.eval_batches(builder, "test", 4, tokenizer))
  explicit = list(ip.eval_batches(builder, "test", 4, tokenizer, process_index=0, process_count=1))
  assert len(default) == len(explicit) == 2
  for a, b in zip(default, explicit):
    np.testing.assert_array_equal(a["index"], b["index"])


def test_eval_text_is_deterministic_and_matches_the_reports(builder, tokenizer):
  texts = ip.split_texts(builder, "val")
  batches = list(ip.eval_batches(builder, "val", 8, tokenizer, process_index=0, process_count=1))
  (batch,) = batches
  n = int(batch["mask"].sum())
  assert n == len(texts["report"]) == len(texts["study_id"])
  ids, _ = tokenizer(texts["report"])
  np.testing.assert_array_equal(batch["input_ids"][:n], ids)


def test_an_eval_batch_is_padded_with_empty_reports_and_blank_volumes(builder, tokenizer):
  texts = ip.split_texts(builder, "val")
  (batch,) = ip.eval_batches(builder, "val", 8, tokenizer, process_index=0, process_count=1)
  n = len(texts["report"])
  assert n < 8 and set(batch) == {"volume", "input_ids", "attention_mask", "mask", "index"}
  ids, attention = tokenizer(list(texts["report"]) + [""] * (8 - n))
  np.testing.assert_array_equal(batch["input_ids"], ids)
  np.testing.assert_array_equal(batch["attention_mask"], attention)
  np.testing.assert_array_equal(batch["mask"], np.arange(8) < n)
  np.testing.assert_array_equal(batch["index"][n:], -1)
  assert not batch["volume"][n:].any()


def test_prefetch_to_device_builds_sharded_global_batches(builder, tokenizer):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  stream = ip.train_batches(builder, "train", 8, tokenizer, seed=0, shuffle_buffer=1,
                            process_index=0, process_count=1)
  batch = next(ip.prefetch_to_device(stream, mesh))
  assert isinstance(batch["volume"], jax.Array)
  assert batch["volume"].shape == (8, 16, 16, 8)
  assert batch["volume"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 4)


def test_prefetch_yields_a_finite_stream_whole_then_ends_on_a_daemon_thread():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  batches = [{"x": np.full((8,), i, np.float32)} for i in range(3)]
  before = set(threading.enumerate())
  stream = ip.prefetch_to_device(iter(batches), mesh)
  first = next(stream)
  (producer,) = [t for t in set(threading.enumerate()) - before if t.name == "prefetch_to_device"]
  assert producer.daemon        # a run that dies with batches queued still exits
  rest = list(itertools.islice(stream, 3))        # one more than is left: the stream must end
  assert [int(b["x"][0]) for b in [first] + rest] == [0, 1, 2]


def test_prefetch_reraises_producer_errors():
  def broken():
    yield {"x": np.zeros((8,), np.float32)}
    raise RuntimeError("decode failed in shard 3")

  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  stream = ip.prefetch_to_device(broken(), mesh)
  next(stream)
  with pytest.raises(RuntimeError, match="shard 3"):
    next(stream)


def test_leaving_the_prefetch_stream_early_stops_its_thread():
  produced = []

  def endless():
    while True:
      produced.append(1)
      yield {"x": np.zeros((8,), np.float32)}

  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  before = set(threading.enumerate())
  stream = ip.prefetch_to_device(endless(), mesh, size=2)
  next(stream)
  producers = [t for t in set(threading.enumerate()) - before if t.name == "prefetch_to_device"]
  assert len(producers) == 1
  deadline = time.monotonic() + 10   # let the producer fill the queue and block on the next put
  while len(produced) < 4 and time.monotonic() < deadline:
    time.sleep(0.01)
  time.sleep(0.3)
  stream.close()   # what `break` out of the training loop does
  for thread in producers:
    thread.join(timeout=5)
  assert not any(t.is_alive() for t in producers)


def test_not_a_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(ip.DatasetError) as err:
    ip.open_dataset(str(tmp_path))
  assert str(err.value) == (f"{str(tmp_path)!r} is not a converted dataset (no "
                            "dataset_info.json); create one with `launch.py convert --data_root R "
                            f"--output_dir {tmp_path}`")


def test_the_spec_names_the_dataset_its_splits_and_label_names(tiny_dataset, labelled):
  _, spec = ip.open_dataset(tiny_dataset)
  assert spec.directory == tiny_dataset and spec.label_names == ()
  assert spec.split_sizes == {"train": 28, "val": 4, "test": 8}
  builder, _ = labelled
  assert ip.open_dataset(builder.data_dir)[1].label_names == phantom_layouts.CTRATE_LABELS


def copy_with_metadata(tiny_dataset, tmp_path, **changes):
  """A copy of the tiny dataset whose metadata.json has `changes` ({key: value}; nested
  preprocess keys as preprocess__shape); returns (directory, metadata.json path)."""
  directory = str(tmp_path / "dataset")
  shutil.copytree(tiny_dataset, directory)
  path = os.path.join(directory, "metadata.json")
  with open(path, encoding="utf-8") as f:
    metadata = json.load(f)
  for key, value in changes.items():
    if key.startswith("preprocess__"):
      metadata["preprocess"][key[len("preprocess__"):]] = value
    else:
      metadata[key] = value
  with open(path, "w", encoding="utf-8") as f:
    json.dump(metadata, f)
  return directory, path


def test_a_dataset_of_another_schema_version_is_refused_naming_its_metadata(tiny_dataset,
                                                                           tmp_path):
  directory, path = copy_with_metadata(tiny_dataset, tmp_path, schema_version=99)
  with pytest.raises(ip.DatasetError) as err:
    ip.open_dataset(directory)
  assert str(err.value) == (f"{path}: schema version 99, this version of launch.py reads version "
                            f"{schema.SCHEMA_VERSION}: reconvert the corpus with `launch.py "
                            "convert` into a new --output_dir")


def test_unusable_preprocessing_metadata_is_refused_naming_its_file(tiny_dataset, tmp_path):
  directory, path = copy_with_metadata(tiny_dataset, tmp_path, preprocess__shape="big")
  with pytest.raises(ip.DatasetError, match=rf"^{re.escape(path)}: .*shape"):
    ip.open_dataset(directory)


def test_volumes_stored_otherwise_than_the_metadata_says_are_refused(tiny_dataset, tmp_path):
  directory, path = copy_with_metadata(tiny_dataset, tmp_path, preprocess__shape=[8, 8, 4])
  with pytest.raises(ip.DatasetError) as err:
    ip.open_dataset(directory)
  message = str(err.value)
  assert message.startswith(f"{directory}: volumes are stored as ((16, 16, 8), ")
  assert f"but {path} records ((8, 8, 4), " in message and message.endswith("reconvert the corpus")


def test_missing_split_names_the_available_ones(builder):
  with pytest.raises(ip.DatasetError, match="no split 'validation'.*'train'"):
    ip.split_files(builder, "validation")


def test_more_processes_than_files_says_how_to_reconvert(builder, tokenizer):
  with pytest.raises(ip.DatasetError, match=r"^split 'val' has \d+ shard files but 8 processes "
                                            r"read it; .*min_shards=8"):
    next(ip.eval_batches(builder, "val", 2, tokenizer, process_index=0, process_count=8))


def test_batch_larger_than_a_process_share_is_a_clear_error(builder, tokenizer):
  with pytest.raises(ip.DatasetError, match="fewer than one batch"):
    next(ip.train_batches(builder, "val", 64, tokenizer, seed=0, process_index=0,
                          process_count=1))


# --- file assignment and batch counts (no dataset needed) ---------------------------------------

def test_files_go_round_robin_with_their_first_dataset_index():
  files = ip.SplitFiles(paths=tuple(f"f{i}" for i in range(7)), lengths=(5, 3, 4, 2, 6, 1, 3))
  assert files.first_index == (0, 5, 8, 12, 14, 20, 21)
  assert files.for_process(1, 3) == (["f1", "f4"], [3, 6], [5, 14])
  assert files.for_process(0, 1) == (list(files.paths), list(files.lengths),
                                     list(files.first_index))


def test_every_process_yields_enough_eval_batches_for_the_largest_share():
  files = ip.SplitFiles(paths=("a", "b", "c"), lengths=(5, 3, 4))
  assert ip.num_eval_batches(files, 4, 2) == 3       # process 0 holds 5 + 4 = 9 studies
  assert ip.num_eval_batches(files, 3, 1) == 4       # 12 studies
  assert ip.num_eval_batches(files, 12, 1) == 1
  empty = ip.SplitFiles(paths=("a", "b"), lengths=(0, 0))
  assert ip.num_eval_batches(empty, 4, 2) == 1       # collectives still meet once


def test_a_shuffle_buffer_of_two_already_mixes_records_across_positions(builder, tokenizer):
  files_only = rows(train(builder, tokenizer, shuffle_buffer=1), 28)
  assert rows(train(builder, tokenizer, shuffle_buffer=2), 28) != files_only


def test_the_training_stream_reads_this_process_share_by_default(builder, tokenizer):
  default = ip.train_batches(builder, "train", 4, tokenizer, seed=3, shuffle_buffer=8)
  assert rows(default, 12) == rows(train(builder, tokenizer), 12)   # process 0 of 1


def test_a_process_holding_exactly_one_batch_trains(builder, tokenizer):
  assert sum(ip.split_files(builder, "val").lengths) == 4
  batch = next(ip.train_batches(builder, "val", 4, tokenizer, seed=0, process_index=0,
                                process_count=1))
  assert batch["volume"].shape[0] == 4


def test_more_training_processes_than_files_names_the_split(builder, tokenizer):
  with pytest.raises(ip.DatasetError, match="split 'val' has .* shard files but 8 processes"):
    next(ip.train_batches(builder, "val", 1, tokenizer, seed=0, process_index=0, process_count=8))


def test_the_stream_is_endless_even_a_thousand_epochs_in(builder, tokenizer):
  batch = next(train(builder, tokenizer, start_batch=7 * 1000 + 3))   # 7 batches an epoch
  assert batch["volume"].shape == (4, 16, 16, 8)


def test_a_slow_consumer_still_gets_every_batch():
  """The producer waits for room however long the training step takes."""
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  batches = ({"x": np.full((8,), i, np.float32)} for i in range(4))
  got = []

  def consume():
    for batch in ip.prefetch_to_device(batches, mesh, size=1):
      time.sleep(0.3)   # a step slower than the producer's put timeout
      got.append(int(batch["x"][0]))

  consumer = threading.Thread(target=consume, daemon=True)
  consumer.start()
  consumer.join(timeout=30)
  assert got == [0, 1, 2, 3]


# --- Which dataset a config names -------------------------------------------------------------

def data_config(tfrecord_dir="", data_root=""):
  config = default.get_config().data
  config.tfrecord_dir, config.data_root = tfrecord_dir, data_root
  return config


def test_the_dataset_is_tfrecord_dir_else_a_converted_data_root(tmp_path):
  (tmp_path / "dataset_info.json").write_text("{}")
  assert ip.resolve_dataset_dir(data_config("/data/converted", str(tmp_path))) == (
      "/data/converted")
  assert ip.resolve_dataset_dir(data_config(data_root=str(tmp_path))) == str(tmp_path)
  assert ip.resolve_dataset_dir(data_config(), required=False) == ""
  with pytest.raises(ip.DatasetError, match=r"^no dataset: pass --config.data.tfrecord_dir DIR "
                                            r"\(a dataset written by `launch.py convert`\) or "
                                            r"--data_root DIR of one$"):
    ip.resolve_dataset_dir(data_config())


@pytest.mark.parametrize("raw", ["meta", "CT-0001"])
def test_a_raw_corpus_as_data_root_prints_the_convert_command(tmp_path, raw):
  (tmp_path / raw).mkdir()
  root, converted = str(tmp_path), str(tmp_path) + "_tfrecords"
  with pytest.raises(ip.DatasetError) as err:
    ip.resolve_dataset_dir(data_config(data_root=root), required=False)
  assert str(err.value) == (
      f"--data_root {root}: a raw corpus (CT*/ct/*.nii.gz, meta/*.csv), not a converted "
      f"dataset. Convert it once:\n  python launch.py convert --data_root {root} --output_dir "
      f"{converted}\nthen pass --config.data.tfrecord_dir {converted}")


@pytest.mark.parametrize("make", ["empty", "missing", "file"])
def test_a_data_root_that_is_neither_dataset_nor_corpus_is_named(tmp_path, make):
  root = tmp_path / "root"
  if make == "empty":
    root.mkdir()
    (root / "scans").mkdir()              # a folder, but not a CT* one
  elif make == "file":
    root.write_text("")
  with pytest.raises(ip.DatasetError, match=rf"^--data_root {root}: not a converted dataset "
                                            r"\(no dataset_info.json\) nor a raw corpus \(no "
                                            r"meta/ or CT\*/ folders\)$"):
    ip.resolve_dataset_dir(data_config(data_root=str(root)))


# --- Labels of a split ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
  """(builder, {study id: label row from the corpus's CSVs}) of a small CT-RATE-layout phantom
  (18 label columns), converted at 8x8x4."""
  root = tmp_path_factory.mktemp("ctrate")
  raw, out = str(root / "raw"), str(root / "tfrecords")
  phantom_layouts.write_phantom_corpus(raw, 8, seed=0, folders=4, layout="ctrate", size=32,
                                       slices=8)
  config = default.get_config().data
  config.data_root, config.shape, config.spacing, config.min_shards = raw, (8, 8, 4), (), 1
  convert.convert_corpus(config, out, workers=0, progress=False, log=lambda *_: None)
  expected = {}
  for path in glob.glob(f"{raw}/**/*labels*.csv", recursive=True):
    for _, row in pd.read_csv(path).iterrows():
      expected[corpus_base.study_id_of(row["VolumeName"])] = [
          int(row[name]) for name in phantom_layouts.CTRATE_LABELS]
  return ip.open_dataset(out)[0], expected


def test_split_labels_are_each_studys_csv_row_in_dataset_order(labelled):
  builder, expected = labelled
  assert len(expected) == 8
  for split in builder.info.splits:
    labels = ip.split_labels(builder, split)
    ids = ip.split_texts(builder, split)["study_id"]
    assert labels.dtype == np.int8 and labels.shape == (len(ids), 18)
    assert labels.tolist() == [expected[study_id] for study_id in ids]
    assert ip.split_labels(builder, split) is labels      # read once per split's files


def test_a_dataset_without_label_names_has_no_label_columns(builder):
  labels = ip.split_labels(builder, "test")
  assert labels.shape == (8, 0) and labels.dtype == np.int8
