#!/usr/bin/env bash
# Mutation testing (mutmut 2.5, in the [dev] extra): do the quick tests fail where the code matters?
#
#   bash bench/mutation.sh                        # the four modules below, one after another (~10 min)
#   bash bench/mutation.sh mnistlab/data/idx.py   # one of them
#   bash bench/mutation.sh "mnistlab/run.py=tests/test_hostile.py -k torn"   # against other tests
#   MUTATION_REF=HEAD~3 bash bench/mutation.sh    # the code and tests of another commit (default HEAD)
#
# Each module is mutated against the quick test files that pin it, in a copy of the commit under a
# temporary folder: mutmut 2.5 rewrites the module in place, so the working tree (and anyone running tests
# in it) never sees a mutant, and no .mutmut-cache is left here. bench/mutation_runner.py serves the test
# runs (torch imported once, a forked pytest per mutant: about 1 s a mutant instead of 5). Prints
# killed/total per module and writes every surviving mutant's diff to <copy>/survivors-<module>.txt, to
# classify by hand (a mutant that changes only a message's text is not a behaviour the tests must pin).
set -euo pipefail

declare -A TESTS=(
  [mnistlab/data/idx.py]="tests/test_idx.py"
  [mnistlab/checkpoint.py]="tests/test_checkpoint.py"
  [mnistlab/deploy/preprocess.py]="tests/test_preprocess.py tests/test_preprocess_large_items.py"
  [mnistlab/run.py]="tests/test_run_folder.py"
)
modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=(mnistlab/data/idx.py mnistlab/checkpoint.py mnistlab/deploy/preprocess.py mnistlab/run.py)

root=$(git rev-parse --show-toplevel)
copy=$(mktemp -d "${TMPDIR:-/tmp}/mnistlab-mutation.XXXXXX")
ref=$(git -C "$root" rev-parse "${MUTATION_REF:-HEAD}")  # fixed now: the branch may move during the run
git -C "$root" archive "$ref" | tar -xf - -C "$copy"
cd "$copy"  # the runner puts this folder first on sys.path: the copy's mnistlab is the one tested
# (the runner itself is the working tree's, so an older MUTATION_REF can be measured too)
echo "mutating ${ref:0:7} in $copy"

python "$root/bench/mutation_runner.py" serve "$copy/.runner.sock" &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 150); do [ -S "$copy/.runner.sock" ] && break; sleep 0.2; done
[ -S "$copy/.runner.sock" ] || { echo "the test server did not start (is the [dev] environment active?)" >&2; exit 1; }

for arg in "${modules[@]}"; do
  module=${arg%%=*}
  if [[ $arg == *=* ]]; then tests=${arg#*=}; else tests=${TESTS[$module]:?"no test files named for $module"}; fi
  rm -f .mutmut-cache
  pytest_args="-x -q -p no:cacheprovider -m 'not slow' $tests"
  # --test-time-base: a shared machine's pauses are not timeouts (a timeout would count as a kill)
  mutmut run --paths-to-mutate "$module" --tests-dir tests --simple-output --no-progress --test-time-base 20 \
    --runner "python $root/bench/mutation_runner.py run $copy/.runner.sock $pytest_args" >/dev/null || true
  # each survivor once more through a plain pytest: a mutant is called a survivor only on the slow path's word
  for id in $(python -c "import sqlite3; print(*(i for (i,) in sqlite3.connect('.mutmut-cache')
      .execute('select id from Mutant where status not in (\"ok_killed\", \"bad_timeout\")')))"); do
    mutmut run "$id" --paths-to-mutate "$module" --tests-dir tests --simple-output --no-progress \
      --test-time-base 20 --runner "python $root/bench/mutation_runner.py plain $pytest_args" >/dev/null || true
  done
  cmp -s "$module" <(git -C "$root" show "$ref:$module") \
    || echo "warning: $module in the copy was left mutated" >&2
  survivors="survivors-${module//\//_}.txt"
  python - "$module" "$survivors" <<'EOF'
import sqlite3, subprocess, sys
module, out = sys.argv[1], sys.argv[2]
rows = sqlite3.connect(".mutmut-cache").execute(
    "select m.id, m.status from Mutant m join Line l on m.line = l.id join SourceFile f on l.sourcefile = f.id"
    " where f.filename = ?", (module,)).fetchall()
count = {s: sum(1 for _, st in rows if st == s) for s in {st for _, st in rows}}
killed = count.get("ok_killed", 0) + count.get("bad_timeout", 0)  # a mutant that hangs the tests is caught
print(f"{module}: {killed}/{len(rows)} mutants killed ({killed / max(len(rows), 1):.0%}); {count}")
with open(out, "w") as f:
    for mid, status in rows:
        if status not in ("ok_killed", "bad_timeout"):
            f.write(f"# mutant {mid}: {status}\n")
            f.write(subprocess.run(["mutmut", "show", str(mid)], capture_output=True, text=True).stdout + "\n")
EOF
  echo "  survivors: $copy/$survivors"
done
