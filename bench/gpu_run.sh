#!/usr/bin/env bash
# Everything a lent GPU is for, in one call: the kernel tests compiled for real (QIN_TEST_CUDA=1),
# then the full benchmark report with the code-generation table. Run from the repository root:
#     OUT=/some/folder bash bench/gpu_run.sh
# Results land in $OUT (at most 8 files): device.txt, tests_cuda.log, bench.log, report/...
# Copy $OUT/report into bench/results/<device>-<date>/ and commit it.
set -uo pipefail
OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; \
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/device.txt" 2>&1
QIN_TEST_CUDA=1 python3 -m pytest tests/test_asta.py tests/test_qnn.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests_cuda.log"
tests_rc=${PIPESTATUS[0]}
python3 -m bench --device cuda --codegen --out "$OUT/report" --force 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests exit $tests_rc, bench exit $bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
