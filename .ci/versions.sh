#!/usr/bin/env bash
# The torch/Triton pairs setup.py claims, each tested in a throwaway venv: the kernel tests under
# Triton's interpreter, the offline compilation of every kernel for sm_89 and sm_90 (the compiler
# path of `qin bench --codegen`) and the no-triton fallback. Lives beside .ci/run because it is a
# CI step (it installs things), not a benchmark.
#
#   bash .ci/versions.sh                 the full matrix below: CUDA builds of torch from PyPI,
#                                        about 5 GB and 8-12 minutes of installing per pair on 2 cores
#   bash .ci/versions.sh --quick         the floor's Triton against the torch already installed (CI's
#                                        torch 2.13.0 CPU): triton goes to a folder put first on
#                                        PYTHONPATH, nothing else is installed
#   bash .ci/versions.sh [--keep DIR] "torch==A triton==B ..." ...
#                                        the given pairs (pip requirements, one quoted string a pair);
#                                        --keep puts the venvs in DIR and leaves them (a second run
#                                        reuses them), otherwise they are deleted
# Exit status 1 if any pair fails; a summary line per pair is printed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."

TESTS=(tests/test_asta.py tests/test_qnn.py tests/test_codegen.py tests/test_no_triton.py)
# Triton's interpreter in 3.3.1 and 3.6.0 (3.9.0 is fine, 3.7/3.8 untested) turns 1-element arrays into Python
# ints, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted"): those pairs pin numpy.
FLOOR="torch==2.7.1 triton==3.3.1 numpy<2.4"  # the oldest pair: setup.py's floor
PAIRS=(
    "$FLOOR"
    "torch==2.11.0 triton==3.6.0 numpy<2.4"   # a current CUDA image, where the kernels were seen correct
    "torch==2.15.0 triton==3.9.0"             # the newest on PyPI
)
# The pairs are exact pins: a machine-wide pip constraints file (this one caps torch at 2.14.1)
# must not change them.
export PIP_CONSTRAINT=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1

quick=0 keep=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1; shift ;;
        --keep) keep="$2"; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] && PAIRS=("$@")

root="${keep:-$(mktemp -d /tmp/qin-versions.XXXXXX)}"
mkdir -p "$root"
[ -z "$keep" ] && trap 'rm -rf "$root"' EXIT
summary=()
status=0

# run_tests LABEL PYTHON [ENV...]: the test files with that interpreter; records a summary line.
run_tests() {
    local label="$1" python="$2" start log rc
    shift 2
    log="$root/$(echo "$label" | tr -c 'A-Za-z0-9.\n' '_').log"
    start=$SECONDS
    # A worker per core where pytest-xdist is installed (CI's venv, the pairs' `.[test]`), each test
    # file on one worker, as the README's test command runs them.
    local parallel=()
    env "$@" "$python" -c "import xdist" 2>/dev/null && parallel=(-n auto --dist loadfile)
    env "$@" "$python" -m pytest -q -p no:cacheprovider "${parallel[@]}" "${TESTS[@]}" >"$log" 2>&1
    rc=$?
    local versions
    versions=$(env "$@" "$python" -c 'import torch, triton, numpy; print(f"torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")' 2>&1 | tail -n 1)
    local result
    result=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$log" | tail -n 1)
    [ $rc -eq 0 ] && verdict=PASS || { verdict=FAIL; status=1; tail -n 40 "$log"; }
    summary+=("$verdict  $label  ($versions): ${result:-no pytest summary (its log is printed above)}; tests $((SECONDS - start)) s")
}

if [ $quick -eq 1 ]; then
    # The torch part of a pair is whatever is installed; only the floor's Triton (and numpy) change.
    reqs=()
    for r in $FLOOR; do case "$r" in torch*) ;; *) reqs+=("$r") ;; esac; done
    dir="$root/quick-target"
    start=$SECONDS
    python3 -m pip install -q --no-deps --target "$dir" "${reqs[@]}" || exit 1
    echo "installed ${reqs[*]} into $dir in $((SECONDS - start)) s"
    run_tests "installed torch + ${reqs[*]}" python3 PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}"
else
    for pair in "${PAIRS[@]}"; do
        # No '=' in the folder's name: `env` (run_tests) would read its path as a variable assignment.
        venv="$root/$(echo "$pair" | tr -c 'A-Za-z0-9.\n' '_')"
        start=$SECONDS
        # `-e .[test]` makes pip check the pair against setup.py's stated range as well.
        if ! { [ -x "$venv/bin/python" ] || python3 -m venv "$venv"; } ||
           ! "$venv/bin/python" -m pip install -q $pair -e ".[test]" >"$venv.install.log" 2>&1; then
            tail -n 20 "$venv.install.log"
            summary+=("FAIL  $pair: install failed (the end of its log is printed above)")
            status=1
            continue
        fi
        echo "installed $pair in $((SECONDS - start)) s ($(du -sh "$venv" | cut -f1))"
        run_tests "$pair" "$venv/bin/python"
    done
fi

echo
printf '%s\n' "${summary[@]}"
exit $status
