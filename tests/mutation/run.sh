#!/usr/bin/env bash
# Mutation testing of one module (mutmut 3): tests/mutation/run.sh NAME [MUTANT_GLOB...]
#
# NAME is a row of tests/mutation/modules.txt: its source file is mutated and every mutant runs
# against that row's test files only (the tests that reach the mutated function, as mutmut
# measured on the clean code); words of the row like NAME=VALUE are set in their environment.
# The work happens in a copy of the repository under
# .mutation/NAME/ (git-ignored), so the working tree is never modified and a rerun resumes:
# results stand for unchanged functions; new tests are detected and measured; name mutants
# (globs such as 'medfinder_jax.train_step.x_step_key*') to run just those again.
#
# Environment: MUTATION_WORK (the work directory, default .mutation/NAME), MUTATION_CHILDREN (parallel mutants, default 2), MUTATION_TIMEOUT_S (seconds
# added to each mutant's measured test time before its wall-clock limit, default 30).
# XLA compilations are cached on disk in .mutation/jax_cache (JAX_COMPILATION_CACHE_DIR to move
# it), shared by all modules: most mutants leave the traced programs unchanged, so their test
# runs reuse the clean run's compiles (the cache key is the program, so a mutant never reads
# another program's code).
# Prints the survivors, a one-line summary and the survivors tests/mutation/equivalent.md does not
# list yet (tests/mutation/unlisted.py); exit 0 whatever survived (read the summary).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
python="$root/.venv/bin/python"
name=${1:?usage: tests/mutation/run.sh NAME [MUTANT_GLOB...] (NAME: a row of tests/mutation/modules.txt)}
shift
row=$(awk -v n="$name" '$1 == n' tests/mutation/modules.txt)
[ -n "$row" ] || { echo "unknown module $name; one of:"; awk '!/^#/ && NF {print "  " $1}' tests/mutation/modules.txt; exit 2; }
read -r _ source tests <<<"$row"
# Words of the row such as NUMBA_DISABLE_JIT=1 are set in the environment of the tests.
args=()
for word in $tests; do
  if [[ $word =~ ^[A-Z_][A-Z0-9_]*= ]]; then export "${word?}"; else args+=("$word"); fi
done

work=${MUTATION_WORK:-"$root/.mutation/$name"}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-"$root/.mutation/jax_cache"}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
mkdir -p "$work"
# The tree as git sees it (tracked + untracked, not ignored), refreshed on every run.
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$work"
{
  echo "[mutmut]"
  echo "source_paths ="; printf '    %s\n' medfinder_jax data_prep
  echo "only_mutate = $source"
  echo "also_copy ="; printf '    %s\n' configs launch.py pytest.ini benchmarks docs
  echo "pytest_add_cli_args_test_selection ="; printf '    %s\n' "${args[@]}"
  echo "process_isolation = forkserver"
  echo "timeout_multiplier = 4.0"
  echo "timeout_constant = ${MUTATION_TIMEOUT_S:-30}"
} >"$work/setup.cfg"

cd "$work"
start=$(date +%s)
"$python" -m mutmut run --max-children "${MUTATION_CHILDREN:-2}" "$@" >mutmut.log 2>&1 || {
  tail -c 4000 mutmut.log; echo "mutmut failed (log: .mutation/$name/mutmut.log)"; exit 1; }
"$python" -m mutmut results --all true >results.txt 2>&1
grep -Ev ': (killed|not checked)$' results.txt || true
awk -v name="$name" -v s="$(( $(date +%s) - start ))" '
  {n++; c[$NF]++}
  END {printf "%s: %d mutants, %d killed, %d timeout, %d survived, %d no tests, %d not checked (%ds)\n",
       name, n, c["killed"], c["timeout"], c["survived"], c["tests"], c["checked"], s}' results.txt
# Survivors equivalent.md does not list yet (each needs a test or a line there).
"$python" "$root/tests/mutation/unlisted.py" "$name" results.txt || true
