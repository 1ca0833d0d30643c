#!/usr/bin/env bash
# GPU check of the CUDA C++ extension (csrc/): compile check, timed JIT build, GPU tests of the
# CUDA kernels, and the cuda vs triton vs eager benchmark (CSV + autoselect table).
#   bash benchmarks/gpu_check_cuda.sh [OUTDIR]      (default: $OUT, else benchmarks/results)
# About 2 minutes on an H100/H200 with a cold build cache. Each part is bounded in time and a
# failing part never stops the next; the exit code is non-zero if any part failed.
# Files written to OUTDIR: gpu_check_cuda.log, <gpu>.csv (appended), backend_table.json.
set -u -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/gpu_check_cuda.log"
: >"$LOG"
PY="${PYTHON:-python3}"
FAILED=""
# Hopper only unless told otherwise: one arch keeps the build short.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"

source benchmarks/parts.sh  # part NAME LIMIT CMD... (no TOTAL: no overall budget)

if ! "$PY" -c "import fastdiff.kernels" 2>/dev/null; then
    part install 120 "$PY" -m pip install --no-deps --no-build-isolation -q -e .
fi
if ! "$PY" -c "import fastdiff.kernels" 2>/dev/null; then
    echo "=== fastdiff not importable after install: using PYTHONPATH" | tee -a "$LOG"
    [ -e fastdiff/kernels ] || ln -s ../kernels fastdiff/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

part versions 60 bash -c "nvidia-smi -L; nvcc --version | tail -n 2; ninja --version; \
$PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'"

part compile-check 120 bash csrc/check_compile.sh

# The build the tests and benchmark then reuse (cached under ~/.cache/fastdiff unless
# FASTDIFF_CUDA_BUILD_DIR or TORCH_EXTENSIONS_DIR says otherwise).
part build 240 env FASTDIFF_CUDA_VERBOSE=1 "$PY" -c "
import sys, time
import fastdiff.ops.cuda_extension as ext
begin = time.perf_counter()
ok = ext.available()
print(f'build+load: {time.perf_counter() - begin:.1f} s;', ext.origin() if ok else ext.unavailable_reason())
sys.exit(0 if ok else 1)
"

# One pytest process per file, so that a crash in one cannot hide the others' results.
for test_file in test_cuda_extension test_cuda_autoselect test_cuda_group_norm \
    test_cuda_sampler_step; do
    part "$test_file" 150 env FASTDIFF_REQUIRE_CUDA_EXTENSION=1 "$PY" -m pytest -q \
        -p no:cacheprovider -o addopts="" -rfEs --tb=short "tests/ops/$test_file.py"
done

part bench 150 "$PY" benchmarks/bench_cuda_backend.py --quick --out "$OUTDIR" \
    --table "$OUTDIR/backend_table.json"

if [ -n "$FAILED" ]; then
    echo "=== gpu_check_cuda: FAILED parts:$FAILED (log: $LOG)" | tee -a "$LOG"
    exit 1
fi
echo "=== gpu_check_cuda: all parts passed (log: $LOG)" | tee -a "$LOG"
