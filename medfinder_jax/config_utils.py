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
