"""Converted TFRecords -> per-process tf.data -> host batches -> global jax.Arrays.

Each process reads only its own shard files (file i goes to process i % process_count), so a
split needs at least as many shard files as processes (`data.min_shards` at conversion).

Training stream (`train_batches`): an endless sequence of epochs; epoch e visits this process's
files in an order and through a shuffle buffer both seeded by (seed, process, e), so the stream is
a pure function of the seed. A position is just the number of batches consumed: resuming at
batch k rebuilds the stream and skips k * local_batch *serialized* records before anything is
decoded, so the next batch is exactly the one an uninterrupted run would have seen (as long as the
process count is the same). Reports get the released code's random 100-word window (its RNG seeded by
(seed, process, batch)) and are tokenized per batch on the host.

Evaluation (`eval_batches`): each process reads its files in order; every batch has the same size
on every process, the last ones padded; `mask` marks real rows and `index` is each study's
position in the split (dataset order), so gathered results can be put back in order with every
study counted once.

Host batches hold numpy arrays: `volume` (B, X, Y, Z) in the stored dtype (uint8 or int16: turned
into [0, 1] floats on the device by `DatasetSpec.intensity`, which keeps the
host->device copy small), `input_ids` and `attention_mask` (B, max_tokens) int32, and for
evaluation `mask` (B,) bool and `index` (B,) int32 (-1 for padding).
"""

import dataclasses
import os
import queue
import threading

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_prep import schema
from medfinder_jax import errors
from medfinder_jax import logging as logging_lib
from medfinder_jax import sharding
from medfinder_jax import text as text_lib

# tf.data must never grab the accelerators, and keeps to the host threads.
tf.config.set_visible_devices([], "GPU")
# tfds reads the features' deprecated `dtype` itself when it decodes records (nothing to change here).
logging_lib.drop_library_notices("`FeatureConnector.dtype` is deprecated")

_SEED_MIX = 0x5EED  # separates the data seed from other uses of config.seed


class DatasetError(errors.UserError):
  """A converted dataset that is missing, incomplete or unusable as asked; names the path."""


DatasetSpec = schema.DatasetSpec  # what the model and the train step need to know


@dataclasses.dataclass(frozen=True)
class SplitFiles:
  """A split's shard files in dataset order, their study counts and first dataset index."""
  paths: tuple
  lengths: tuple

  @property
  def first_index(self):
    return tuple(int(x) for x in np.cumsum((0,) + self.lengths[:-1]))

  def for_process(self, process_index, process_count):
    """The files process `process_index` reads (round robin), with their first indices."""
    mine = range(process_index, len(self.paths), process_count)
    first_index = self.first_index
    return ([self.paths[i] for i in mine], [self.lengths[i] for i in mine],
            [first_index[i] for i in mine])


def resolve_dataset_dir(data_config, required=True):
  """The converted dataset the config names: data.tfrecord_dir, else data.data_root when it is
  a converted dataset; "" when none is named and not `required`. A raw corpus given as
  data_root is an error that prints the `launch.py convert` command to run."""
  if data_config.tfrecord_dir:
    return data_config.tfrecord_dir
  root = data_config.data_root
  if not root:
    if not required:
      return ""
    raise DatasetError("no dataset: pass --config.data.tfrecord_dir DIR (a dataset written by "
                       "`launch.py convert`) or --data_root DIR of one")
  if os.path.isfile(os.path.join(root, "dataset_info.json")):
    return root
  if os.path.isdir(os.path.join(root, "meta")) or any(
      name.startswith("CT") for name in (os.listdir(root) if os.path.isdir(root) else ())):
    converted = os.path.abspath(root) + "_tfrecords"
    raise DatasetError(
        f"--data_root {root}: a raw corpus (CT*/ct/*.nii.gz, meta/*.csv), not a converted "
        f"dataset. Convert it once:\n  python launch.py convert --data_root {root} "
        f"--output_dir {converted}\nthen pass --config.data.tfrecord_dir {converted}")
  raise DatasetError(f"--data_root {root}: not a converted dataset (no dataset_info.json) nor "
                     "a raw corpus (no meta/ or CT*/ folders)")


def open_dataset(directory):
  """(tfds builder, DatasetSpec) of a dataset written by `launch.py convert`."""
  if not os.path.isfile(os.path.join(directory, "dataset_info.json")):
    raise DatasetError(f"{directory!r} is not a converted dataset (no dataset_info.json); "
                       "create one with `launch.py convert --data_root R --output_dir "
                       f"{directory}`")
  builder = tfds.builder_from_directory(directory)
  metadata = builder.info.metadata or {}
  source = os.path.join(directory, "metadata.json")
  if metadata.get("schema_version") != schema.SCHEMA_VERSION:
    raise DatasetError(f"{source}: schema version {metadata.get('schema_version')!r}, this "
                       f"version of launch.py reads version {schema.SCHEMA_VERSION}: reconvert "
                       f"the corpus with `launch.py convert` into a new --output_dir")
  try:
    preprocess = schema.PreprocessParams.from_dict(metadata.get("preprocess"), source)
  except ValueError as err:
    raise DatasetError(str(err)) from None
  volume = builder.info.features[schema.VOLUME]
  stored = (tuple(int(s) for s in volume.shape), str(np.dtype(volume.np_dtype)))
  if stored != (preprocess.shape, preprocess.volume_dtype):
    raise DatasetError(f"{directory}: volumes are stored as {stored} but {source} records "
                       f"{(preprocess.shape, preprocess.volume_dtype)}; reconvert the corpus")
  spec = DatasetSpec(
      directory=directory, preprocess=preprocess,
      split_sizes={name: int(info.num_examples) for name, info in builder.info.splits.items()},
      label_columns=schema.label_columns_of(builder.info.features.keys()),
      label_names=tuple(metadata.get("label_names") or ()))
  return builder, spec


def split_files(builder, split):
  """SplitFiles of `split`, with a clear error when the dataset has no such split."""
  splits = builder.info.splits
  if split not in splits:
    raise DatasetError(f"{builder.data_dir!r} has no split {split!r}; it has "
                       f"{sorted(splits.keys())} (an empty split is left out at conversion)")
  info = splits[split]
  return SplitFiles(paths=tuple(os.fspath(p) for p in info.filepaths),
                    lengths=tuple(int(n) for n in info.shard_lengths))


def _check_enough_files(files, split, process_count):
  if len(files.paths) < process_count:
    raise DatasetError(
        f"split {split!r} has {len(files.paths)} shard files but {process_count} processes read "
        f"it; each process needs its own files: reconvert with "
        f"--config.data.min_shards={process_count} (or more)")


def _decoder(builder, names):
  """Serialized record -> dict of the requested features (the others are parsed, not decoded)."""
  features = builder.info.features
  skip = {name: tfds.decode.SkipDecoding() for name in features.keys() if name not in names}

  def decode(serialized):
    example = features.deserialize_example(serialized, decoders=skip)
    return {name: example[name] for name in names}

  return decode


def _epoch_records(paths, seed, epoch, shuffle_buffer):
  """Serialized records of one epoch: files in a seeded order, then a seeded shuffle buffer."""
  files = tf.constant(paths)
  order_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
  files = tf.random.experimental.stateless_shuffle(files, seed=order_seed)
  records = tf.data.TFRecordDataset(files)
  if shuffle_buffer > 1:
    shuffle_seed = tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)
    records = records.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
  return records


def train_records(builder, split, local_batch, *, seed, start_batch=0, shuffle_buffer=256,
                  process_index=None, process_count=None):
  """tf.data of decoded (volume, report) examples, batched, endless, resumable.

  `start_batch`: batches this process already consumed (the resume position).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  files = split_files(builder, split)
  _check_enough_files(files, split, process_count)
  paths, lengths, _ = files.for_process(process_index, process_count)
  per_epoch = sum(lengths)
  if per_epoch < local_batch:
    raise DatasetError(f"split {split!r}: process {process_index} holds {per_epoch} studies, "
                       f"fewer than one batch of {local_batch}; lower the batch size")
  first_record = start_batch * local_batch
  first_epoch, skip = divmod(first_record, per_epoch)
  process_seed = (seed * 7919 + process_index * 104729 + _SEED_MIX) % (2**62)
  epochs = tf.data.Dataset.range(first_epoch, 2**62)
  records = epochs.flat_map(lambda e: _epoch_records(paths, process_seed, e, shuffle_buffer))
  decode = _decoder(builder, (schema.VOLUME, schema.REPORT))
  dataset = records.skip(skip).map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return dataset.batch(local_batch, drop_remainder=True).prefetch(2)


def train_batches(builder, split, local_batch, tokenizer, *, seed, start_batch=0,
                  shuffle_buffer=256, window_words=100, process_index=None, process_count=None):
  """Host training batches (see module doc), from batch `start_batch` of the endless stream."""
  process_index = jax.process_index() if process_index is None else process_index
  dataset = train_records(builder, split, local_batch, seed=seed, start_batch=start_batch,
                          shuffle_buffer=shuffle_buffer, process_index=process_index,
                          process_count=process_count)
  for batch_number, batch in enumerate(dataset.as_numpy_iterator(), start=start_batch):
    rng = np.random.default_rng((seed, process_index, batch_number, _SEED_MIX))
    reports = [r.decode("utf-8") for r in batch[schema.REPORT]]
    ids, mask = text_lib.tokenize_reports(tokenizer, reports, rng, window_words)
    yield {"volume": batch[schema.VOLUME], "input_ids": ids, "attention_mask": mask}


def num_eval_batches(files, local_batch, process_count):
  """Batches every process yields for a split: enough for the process holding the most studies."""
  most = max(sum(files.for_process(p, process_count)[1]) for p in range(process_count))
  return max(1, -(-most // local_batch))


def eval_batches(builder, split, local_batch, tokenizer, *, process_index=None,
                 process_count=None):
  """Host evaluation batches: each study once, deterministic text, padded, with mask and index.

  Every process yields `num_eval_batches(...)` batches (collectives need the same count).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  files = split_files(builder, split)
  _check_enough_files(files, split, process_count)
  paths, lengths, firsts = files.for_process(process_index, process_count)
  total = num_eval_batches(files, local_batch, process_count)
  decode = _decoder(builder, (schema.VOLUME, schema.REPORT))

  def with_index(path, first):
    return tf.data.TFRecordDataset(path).enumerate(start=first)

  pieces = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(firsts, np.int64)))
  dataset = pieces.flat_map(with_index).map(
      lambda i, record: {"index": tf.cast(i, tf.int32), **decode(record)},
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(local_batch).prefetch(2)
  shape = tuple(builder.info.features[schema.VOLUME].shape)
  dtype = builder.info.features[schema.VOLUME].np_dtype
  yielded = 0
  for batch in dataset.as_numpy_iterator():
    yield _padded_eval_batch(batch, local_batch, tokenizer)
    yielded += 1
  empty = {"index": np.zeros((0,), np.int32), schema.VOLUME: np.zeros((0,) + shape, dtype),
           schema.REPORT: np.zeros((0,), object)}
  for _ in range(total - yielded):
    yield _padded_eval_batch(empty, local_batch, tokenizer)


def _padded_eval_batch(batch, local_batch, tokenizer):
  n = len(batch["index"])
  pad = local_batch - n
  reports = [r.decode("utf-8") for r in batch[schema.REPORT]] + [""] * pad
  ids, attention = tokenizer(reports)
  volume = batch[schema.VOLUME]
  volume = np.concatenate([volume, np.zeros((pad,) + volume.shape[1:], volume.dtype)])
  return {"volume": volume, "input_ids": ids, "attention_mask": attention,
          "mask": np.arange(local_batch) < n,
          "index": np.concatenate([batch["index"], np.full((pad,), -1, np.int32)])}


_SPLIT_TEXTS = {}
_SPLIT_LABELS = {}
# scan_id groups reconstructions of one scan (CT-RATE; the study id elsewhere), patient_id is
# CT-RATE's patient key ("" elsewhere): evaluation may merge a scan's reconstructions.
TEXT_COLUMNS = (schema.STUDY_ID, schema.REPORT, schema.SOURCE_PATH, schema.SCAN_ID,
                schema.PATIENT_ID)


def _files_key(split, files):
  return (split, tuple((path, os.stat(path).st_size, os.stat(path).st_mtime_ns)
                       for path in files.paths))


def split_texts(builder, split):
  """{column: list of str} of TEXT_COLUMNS for every study of `split` in dataset order
  (volumes not decoded). Read once per split's files (as they are on disk): a run validates
  the same split at every epoch."""
  files = split_files(builder, split)
  key = _files_key(split, files)
  if key not in _SPLIT_TEXTS:
    _SPLIT_TEXTS[key] = _read_split_texts(builder, files, TEXT_COLUMNS)
  return _SPLIT_TEXTS[key]


def split_labels(builder, split):
  """(N, L) int8 multi-hot labels of every study of `split` in dataset order (the order of
  split_texts); the names of the L columns are the DatasetSpec's `label_names` (the dataset
  metadata's "label_names"). A dataset without label names gives an (N, 0) array."""
  files = split_files(builder, split)
  key = _files_key(split, files)
  if key not in _SPLIT_LABELS:
    _SPLIT_LABELS[key] = _read_split_labels(builder, files)
  return _SPLIT_LABELS[key]


def _read_split_labels(builder, files):
  features = builder.info.features
  if schema.LABELS not in features:
    return np.zeros((sum(files.lengths), 0), np.int8)
  decoders = {name: tfds.decode.SkipDecoding() for name in features.keys()
              if name != schema.LABELS}

  def labels_of(record):
    return features.deserialize_example(record, decoders=decoders)[schema.LABELS]

  rows = list(tf.data.TFRecordDataset(list(files.paths)).map(labels_of).as_numpy_iterator())
  width = int(features[schema.LABELS].shape[0])
  return np.asarray(rows, np.int8).reshape(len(rows), width)


def _read_split_texts(builder, files, columns):
  decoders = {schema.VOLUME: tfds.decode.SkipDecoding()}
  features = builder.info.features
  columns = [c for c in columns if c in features]
  out = {c: [] for c in columns}

  def text_columns(record):   # one parse per record
    example = features.deserialize_example(record, decoders=decoders)
    return {c: example[c] for c in columns}

  records = tf.data.TFRecordDataset(list(files.paths)).map(text_columns)
  for example in records.as_numpy_iterator():
    for c in columns:
      out[c].append(example[c].decode("utf-8"))
  return out


def prefetch_to_device(batches, mesh, size=2):
  """Host batches -> global jax.Arrays on `mesh`, built `size` batches ahead on a thread.

  Keeps tokenization and host->device copies off the training loop's critical path. Errors in
  the producer are re-raised in the consumer. A consumer that stops early (the training loop
  leaves an endless stream with `break`) also stops the producer thread, so the batches it holds
  on the devices are freed.
  """
  buffer = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def put(item):
    """Blocks until there is room, or returns False once the consumer has gone."""
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for batch in batches:
        if not put(sharding.make_global_batch(batch, mesh)):
          return
      put(done)
    except BaseException as err:  # pylint: disable=broad-except
      put(err)

  thread = threading.Thread(target=produce, daemon=True, name="prefetch_to_device")
  thread.start()
  try:
    while True:
      item = buffer.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
