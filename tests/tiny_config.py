"""The tests' tiny config as a config file, for `launch.py --config tests/tiny_config.py[:nofusion]`
(in-process and in subprocesses): conftest.make_tiny_config, optionally with fusion disabled."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import make_tiny_config  # noqa: E402  pylint: disable=wrong-import-position

PATH = os.path.abspath(__file__)


def get_config(arg=None):
  if arg == "nofusion":
    return make_tiny_config(**{"model.fusion.enabled": False})
  return make_tiny_config()
