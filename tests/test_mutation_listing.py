"""tests/mutation/unlisted.py: which survivors equivalent.md lists (the mutation run's last check)."""

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def unlisted():
  spec = importlib.util.spec_from_file_location("unlisted",
                                                os.path.join(HERE, "mutation", "unlisted.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_a_bullet_lists_full_names_short_numbers_and_ranges(unlisted):
  section = ("- `x_f__mutmut_3`, `_5` (why).\n"
             "- `xǁCǁm__mutmut_7` to `_9`, `x_g__mutmut_1`..`_2`, and `_4` (why); `not_a_mutant`.\n")
  assert unlisted.listed(section) == {
      "x_f__mutmut_3", "x_f__mutmut_5", "xǁCǁm__mutmut_7", "xǁCǁm__mutmut_8", "xǁCǁm__mutmut_9",
      "x_g__mutmut_1", "x_g__mutmut_2", "x_g__mutmut_4"}


def test_survivors_not_in_the_section_are_reported(unlisted, tmp_path, capsys):
  results = tmp_path / "results.txt"
  results.write_text("    medfinder_jax.losses.x_siglip__mutmut_21: survived\n"
                     "    medfinder_jax.losses.x_siglip__mutmut_22: killed\n"
                     "    medfinder_jax.losses.x_siglip__mutmut_999: survived\n"
                     "    medfinder_jax.losses.x_siglip__mutmut_1000: no tests\n")
  assert unlisted.main("losses", str(results)) == 1
  assert capsys.readouterr().out.splitlines() == [
      "medfinder_jax.losses.x_siglip__mutmut_999",
      "medfinder_jax.losses.x_siglip__mutmut_1000 (no tests)"]
