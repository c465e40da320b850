#!/usr/bin/env bash
# The GPU suite: on a CUDA machine without network access (torch, nvcc, cmake, ninja, pybind11 and
# scikit-build-core preinstalled), build pyseqkern, run every test (CUDA-marked ones included, and
# nothing may skip for want of CUDA), the CUDA benchmarks, and compute-sanitizer on a small case.
# Logs and JSON go under $OUT (default ./gpu-out), in at most 7 files: summary.txt, build.log, tests.log,
# sanitizer.log, bench-cuda.{log,json,png}.
#   PYSEQKERN_CUDA_ARCHS  architectures to build (default: the GPU's own, e.g. 90)
#   GPU_SUITE_SKIP_BUILD  set to 1 to reuse an existing build
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() { echo "== $* ==" | tee -a "$OUT/summary.txt"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/summary.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/summary.txt"

if [ "${GPU_SUITE_SKIP_BUILD:-0}" != 1 ]; then
  step "build"
  if [ -z "${PYSEQKERN_CUDA_ARCHS:-}" ]; then
    export PYSEQKERN_CUDA_ARCHS=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
  fi
  export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
  if ! python3 -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; echo "build FAILED" | tee -a "$OUT/summary.txt"; exit 1
  fi
  grep -E "pyseqkern:|warning" "$OUT/build.log" | head -20
fi
python3 -m pyseqkern.info | tee -a "$OUT/summary.txt"
python3 -c "import pyseqkern, sys; c = pyseqkern.backend_info()['cuda']; sys.exit(0 if c['usable'] else 'CUDA not usable: ' + str(c['reason']))" \
  || { echo "CUDA not usable" | tee -a "$OUT/summary.txt"; exit 1; }

step "tests (all, CUDA included)"
python3 -m pytest tests -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1
if grep -q "needs a usable CUDA device" "$OUT/tests.log"; then
  echo "CUDA tests were skipped on a GPU machine" | tee -a "$OUT/summary.txt"; status=1
fi
tail -1 "$OUT/tests.log" >> "$OUT/summary.txt"

step "compute-sanitizer (memcheck, racecheck) on the CUDA probe tests"
for tool in memcheck racecheck; do
  echo "---- $tool" >> "$OUT/sanitizer.log"
  timeout 300 compute-sanitizer --tool "$tool" --error-exitcode 9 python3 -m pytest tests/test_probe_op.py -q -p no:cacheprovider \
    -m cuda -k "not graph" >> "$OUT/sanitizer.log" 2>&1
  rc=$?
  echo "$tool: exit $rc; $(grep -E '(ERROR|RACECHECK) SUMMARY' "$OUT/sanitizer.log" | tail -1)" | tee -a "$OUT/summary.txt"
  [ $rc = 0 ] || status=1
done

step "compute-sanitizer (memcheck, racecheck) on small CUDA RNN cases (both kernel paths)"
for tool in memcheck racecheck; do
  echo "---- rnn $tool" >> "$OUT/sanitizer.log"
  timeout 600 compute-sanitizer --tool "$tool" --error-exitcode 9 python3 -m pytest tests/test_rnn_ops.py -q \
    -p no:cacheprovider -m cuda -k "raw_kernel_writes_every_output or cuda_paths_agree" >> "$OUT/sanitizer.log" 2>&1
  rc=$?
  echo "rnn $tool: exit $rc; $(grep -E '(ERROR|RACECHECK) SUMMARY' "$OUT/sanitizer.log" | tail -1)" | tee -a "$OUT/summary.txt"
  [ $rc = 0 ] || status=1
done

step "benchmarks (CUDA, full suite)"
python3 -m pyseqkern.bench --device cuda --full --json "$OUT/bench-cuda.json" --plot "$OUT/bench-cuda.png" \
  2>&1 | tee "$OUT/bench-cuda.log" | tail -40
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "result: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
