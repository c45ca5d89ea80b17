"""Config files (`get_config()` in a Python file) and `--config.key=value` overrides."""

import ast
import contextlib
import importlib.util
import os
import sys

import ml_collections

from medfinder_jax import errors


class ConfigError(errors.UserError):
  """A config file or override that cannot be applied; the message names it."""


def load_config_file(spec):
  """Loads `path/to/file.py` or `path/to/file.py:arg` and returns its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  module_name = "_medfinder_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  with _importable_siblings(os.path.dirname(os.path.abspath(path))):
    module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config() function")
  try:
    return module.get_config(arg or None)
  except (ValueError, TypeError, KeyError) as err:
    raise ConfigError(f"config file {path!r}: get_config({arg or None!r}) failed: {err}") from None


@contextlib.contextmanager
def _importable_siblings(directory):
  """Lets a config file `import default` (a config beside it) while it is loaded."""
  sys.path.insert(0, directory)
  try:
    yield
  finally:
    sys.path.remove(directory)


def parse_value(text, current):
  """Parses `text` into the type of `current` (the field's existing value)."""
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
      return True
    if lowered in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"expected a boolean (true/false), got {text!r}")
  if isinstance(current, (tuple, list)):
    stripped = text.strip().strip("()[]")
    if not stripped:
      return ()
    items = [item.strip() for item in stripped.split(",") if item.strip()]
    element = current[0] if current else _literal_or_text(items[0])
    return tuple(parse_value(item, element) for item in items)
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f"expected an integer, got {text!r}") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"expected a number, got {text!r}") from None
  if isinstance(current, str):
    return text
  return _literal_or_text(text)


def _literal_or_text(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config, overrides):
  """Applies `{"train.lr": "3e-4", ...}` (dotted keys) to `config` in place and returns it.

  String values are parsed into the type of the field (as flags are); other values (e.g. a
  tuple from Python code) are set as they are."""
  for key, text in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node:
        raise ConfigError(f"unknown config section {key!r}: no {part!r} in the config")
      node = node[part]
    if leaf not in node:
      raise ConfigError(f"unknown config key {key!r}; known keys here: {sorted(node.keys())}")
    try:
      value = parse_value(text, node[leaf]) if isinstance(text, str) else text
    except ConfigError as err:
      raise ConfigError(f"--config.{key}: {err}") from None
    with node.ignore_type():
      node[leaf] = value
  return config


def split_config_overrides(argv):
  """Separates `--config.a.b=v` / `--config.a.b v` arguments from the rest of argv."""
  overrides, rest = {}, []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise ConfigError(f"{arg} needs a value")
        value = argv[i + 1]
        i += 1
      overrides[key] = value
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def to_dict(config):
  """A plain, JSON-serializable dict of the config (for logs and checkpoints)."""
  if isinstance(config, ml_collections.ConfigDict):
    return {k: to_dict(v) for k, v in config.items()}
  if isinstance(config, tuple):
    return [to_dict(v) for v in config]
  return config


# --- Checks ---------------------------------------------------------------------------------------

# (dotted key, smallest allowed value, what it means) for the integer and number fields a user
# sets from flags; each is checked once, before any work (launch.py), when the config has it.
LOWER_BOUNDS = (
    ("train.batch_size_per_device", 1, "volumes per device"),
    ("train.epochs", 0, "epochs (0 with train.max_steps > 0)"),
    ("train.max_steps", 0, "optimizer steps (0 = train.epochs)"),
    ("train.grad_accum_steps", 1, "micro-batches per step"),
    ("train.warmup_steps", 0, "warmup steps"),
    ("train.log_every_steps", 1, "steps between log points"),
    ("train.eval_every_steps", 0, "steps between validations (0 = each epoch)"),
    ("train.checkpoint_every_steps", 0, "steps between checkpoints (0 = each epoch)"),
    ("train.keep_checkpoints", 1, "checkpoints kept"),
    ("train.shuffle_buffer", 0, "records in the shuffle buffer"),
    ("train.max_minutes", 0, "minutes of training (0 = no budget)"),
    ("train.weight_decay", 0, "weight decay"),
    ("eval.batch_size_per_device", 1, "volumes per device"),
    ("eval.search_top_k", 1, "results"),
    ("eval.excerpt_chars", 1, "characters"),
    ("data.workers", 0, "worker processes (0 = convert in this process)"),
    ("data.shard_size", 1, "studies per shard"),
    ("data.min_shards", 1, "shards per split"),
    ("text.max_tokens", 2, "tokens ([CLS] and [SEP] included)"),
    ("text.window_words", 1, "words"),
    ("model.embed_dim", 1, "embedding width"),
)
POSITIVE = (("train.lr", "learning rate"),)


def check_config(config):
  """ConfigError naming the first field of `config` outside its range (LOWER_BOUNDS, POSITIVE),
  with the flag that sets it; fields the config does not have are skipped."""
  for key, lowest, meaning in LOWER_BOUNDS:
    value = _lookup(config, key)
    if value is not None and not (_is_number(value) and value >= lowest):
      raise ConfigError(f"--config.{key}={value!r}: expected {meaning}, at least {lowest}"
                        + _flag_note(key))
  for key, meaning in POSITIVE:
    value = _lookup(config, key)
    if value is not None and not (_is_number(value) and value > 0):
      raise ConfigError(f"--config.{key}={value!r}: expected a positive {meaning}"
                        + _flag_note(key))
  train = config.get("train")
  if train is not None and int(train.epochs) == 0 and int(train.max_steps) == 0:
    raise ConfigError("--config.train.epochs=0 and --config.train.max_steps=0: nothing to "
                      "train; set one of them (--epochs N)")
  return config


_FLAGS = {"train.batch_size_per_device": "--batch_size", "train.epochs": "--epochs",
          "train.lr": "--lr", "data.workers": "--workers"}


def _flag_note(key):
  return f" (flag {_FLAGS[key]})" if key in _FLAGS else ""


def _lookup(config, dotted):
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return None
    node = node[part]
  return node


def _is_number(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool)
