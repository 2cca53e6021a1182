#!/bin/sh
# Mutation testing with mutmut 3 (dev extra), time-bounded, in a throwaway worktree of HEAD.
#
#   MODULES="evaluation/gate.py" TESTS="tests/test_gate.py" BUDGET_S=600 sh tests/mutation.sh
#   sh tests/mutation.sh 'palate.evaluation.heldout.x_paired_bootstrap*'   # only these mutants
#   ISOLATION=forkserver MODULES="model/losses.py" TESTS="tests/test_losses.py" sh tests/mutation.sh
#   SAMPLE=80 SEED=1 ...                      # a seeded random sample of 80 mutants
#
# The worktree keeps the shared tree clean (mutmut writes mutants/ and its state next to the
# sources). mutmut 3 maps file paths to module names only for ./, src/ or source/ layouts,
# so the worktree's daemon/ is renamed src/. Results: the run's summary line and
# `mutmut results` (survivors), printed at the end; docs/reliability.md has the figures.
set -eu
MODULES=${MODULES:-"evaluation/gate.py evaluation/heldout.py evaluation/metrics.py"}
TESTS=${TESTS:-"tests/test_gate.py tests/test_evaluation.py"}
BUDGET_S=${BUDGET_S:-600}
# "forkserver" for tests that evaluate MLX arrays: MLX's worker threads do not survive a
# fork, so a child forked from a process that has run MLX hangs on its first eval (every
# mutant times out). The fork server imports only pytest and the test modules; each mutant's
# process starts MLX itself.
ISOLATION=${ISOLATION:-fork}
root=$(git rev-parse --show-toplevel)
work="$(mktemp -d)/palate-mutation"
git -C "$root" worktree add -q --detach "$work" HEAD
trap 'git -C "$root" worktree remove --force "$work"' EXIT
cd "$work"
mv daemon src
{
  echo
  echo "[tool.mutmut]"
  echo 'source_paths = ["src/palate/"]'
  printf 'only_mutate = ['
  for m in $MODULES; do printf '"src/palate/%s", ' "$m"; done
  echo ']'
  printf 'pytest_add_cli_args_test_selection = ['
  for t in $TESTS; do printf '"%s", ' "$t"; done
  echo ']'
  echo 'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]'
  echo "process_isolation = \"$ISOLATION\""
} >> pyproject.toml
# The last progress line is the summary: done/total, killed, no tests, timeout, suspicious,
# survived, skipped.
if [ -n "${SAMPLE:-}" ]; then
  # A uniform random sample of SAMPLE mutants (seeded by SEED), for modules whose tests are
  # too slow to run every mutant: generate them all (a name that matches none runs nothing),
  # list them, draw.
  "$root/.venv/bin/mutmut" run --max-children 2 'palate.no_such_module*' >/dev/null 2>&1 || true
  total=$("$root/.venv/bin/mutmut" results --all true | wc -l)
  yes "${SEED:-0}" | head -c 1000000 > random-source
  set -- $("$root/.venv/bin/mutmut" results --all true | cut -d: -f1 \
    | shuf -n "$SAMPLE" --random-source=random-source | sort)
  echo "sample: $# of $total mutants (seed ${SEED:-0})"
fi
timeout "$BUDGET_S" "$root/.venv/bin/mutmut" run --max-children 2 "$@" | tr '\r' '\n' \
  | grep -E '[0-9]+/[0-9]+ ' | tail -1 || true
# Every mutant that was run and not killed, with its diff (mutants not reached in the budget
# are "not checked" and left out).
"$root/.venv/bin/mutmut" results | grep -v "not checked" | while read -r line; do
  echo "== $line"
  "$root/.venv/bin/mutmut" show "${line%%:*}" 2>/dev/null | grep '^[-+][^-+]' || true
done
