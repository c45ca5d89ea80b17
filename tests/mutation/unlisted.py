"""Survivors of a mutation run that tests/mutation/equivalent.md does not list.

  .venv/bin/python tests/mutation/unlisted.py NAME [RESULTS]

Reads .mutation/NAME/results.txt (or RESULTS) and the "## NAME" section of equivalent.md, where a
bullet names mutants as `x_fn__mutmut_3`, then `_5` for more of the same function, and `_7` to
`_9` (or `_7`..`_9`) for a range. Prints each unlisted survivor; exit 1 when there is one. A
mutant no test reaches ("no tests") survives every run, so it counts as a survivor (marked).
"""

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = re.compile(r"`([^`]+)`")


def listed(section):
  """The set of mutant names (without the module prefix) a section lists."""
  names = set()
  for bullet in re.split(r"\n- ", section):
    prefix, last, tokens = None, None, list(TOKEN.finditer(bullet))
    for i, match in enumerate(tokens):
      token = match.group(1)
      full = re.fullmatch(r"(x\S*__mutmut)_(\d+)", token)
      short = re.fullmatch(r"_(\d+)", token)
      if full:
        prefix, number = full.group(1), int(full.group(2))
      elif short and prefix:
        number = int(short.group(1))
      else:
        continue
      between = bullet[tokens[i - 1].end():match.start()] if i else ""
      start = last + 1 if last is not None and re.fullmatch(r"\s*(to|\.\.)\s*", between) else number
      names.update(f"{prefix}_{n}" for n in range(start, number + 1))
      last = number
  return names


def main(name, results=None):
  results = results or os.path.join(HERE, "..", "..", ".mutation", name, "results.txt")
  text = open(os.path.join(HERE, "equivalent.md"), encoding="utf-8").read()
  match = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
  if not match:
    sys.exit(f"equivalent.md has no '## {name}' section")
  names = listed(match.group(1))
  if not os.path.exists(results):
    sys.exit(f"{results}: no results yet (run tests/mutation/run.sh {name} first)")
  missing = []
  for line in open(results, encoding="utf-8"):
    mutant, _, status = line.strip().rpartition(": ")
    if status in ("survived", "no tests") and mutant.rsplit(".", 1)[-1] not in names:
      missing.append(mutant + (" (no tests)" if status == "no tests" else ""))
  print("\n".join(missing) or f"{name}: every survivor is listed")
  return 1 if missing else 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
