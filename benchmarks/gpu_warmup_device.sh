#!/usr/bin/env bash
# The warm-up check as one device call (benchmarks/NOTES.md, "What the next GPU run settles", 1):
#   1. tune the attention kernel at the SD1.5 and SDXL U-Nets' shapes (tune_attention.py) and put
#      the winners where the launcher reads them (fastdiff/assets/attention_configs/);
#   2. time the U-Nets' first call (bench_unet's warm-up column: Triton compilation, autotuning,
#      graph capture) in fresh processes with empty Triton caches, as on a fresh machine, with
#      the table and with it off (FASTDIFF_ATTENTION_CONFIGS=off), and with the kernels compiled
#      in 16 threads (compile_ahead, ParallelCompile) or one by one (FASTDIFF_COMPILE_THREADS=1:
#      the compile-ahead pass still runs, serially; with the table off, that is the warm-up
#      before all three but for the shorter timing of each candidate, AUTOTUNE_TIMING_MS),
#      once without the CUDA extension built (a fresh install) and once without the compile-ahead
#      pass (FASTDIFF_COMPILE_AHEAD=0);
#   3. (run before 2, so that a budget cut takes timed rows, not tests) the attention GPU tests
#      with the new table in place, and the CUDA-graph runtime tests.
#   run: bash benchmarks/gpu_warmup_device.sh     (timeout_s 450; nothing needs carrying)
#   TUNE=0 skips step 1 (the committed table is used); ROW names as arguments run only those
#   rows (bash benchmarks/gpu_warmup_device.sh sd15_table sdxl_table).
# $OUT gets sm_XX.json (the table to commit), warmup.log (everything) and warmup.csv (a row per
# ROWS line below that finished, its name first in the note).
# Without a GPU, step 1 says so and the rest runs the CPU paths, so the script can be tried
# anywhere (OUT=/tmp/x bash benchmarks/gpu_warmup_device.sh).
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:?set OUT to the folder to bring back (the device tool sets it)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
LOG="$OUT/warmup.log"
: >"$LOG"
FAILED=""
SCRATCH="$(mktemp -d)"

# Everything within TOTAL seconds (default 400: a device call's limit leaves room for the
# machine's start and a short rerun); see parts.sh.
TOTAL="${TOTAL:-400}"
source benchmarks/parts.sh  # part NAME LIMIT CMD...

# NAME WORKLOAD TABLE THREADS EXTENSION AHEAD: the workload (bench_unet's, or pipeline20 /
# pipeline4: bench_pipeline's SD1.5 512x512 generation, whose first call also captures the VAE
# decode and, at 4 steps, the whole loop), the table ("packaged": the one just written; or
# off), the compile threads (compile_ahead's and the autotuner's; 1 = one kernel at a time), the
# CUDA extension: "built" (above, as in every earlier warm-up figure) or "none" (an empty build
# folder: a fresh install, where the auto backend takes Triton rather than build it), and the
# compile-ahead pass (FASTDIFF_COMPILE_AHEAD: 1, 0, or "apart": on, with the VAE decoder's
# kernels left to its own graph's pass instead of the first denoising graph's,
# FASTDIFF_DECODE_AHEAD=0). Most important rows first: the budget cuts from the end.
declare -A ROW
ORDER=()
while read -r name settings; do
    ROW[$name]="$settings"
    ORDER+=("$name")
done <<'ROWS'
sd15_table sd15_b2 packaged 16 built 1
sd15_off_1thread sd15_b2 off 1 built 1
sd15_fresh_install sd15_b2 packaged 16 none 1
sd15_table_no_ahead sd15_b2 packaged 16 built 0
sdxl_table sdxl_b2 packaged 16 built 1
sd15_table_1thread sd15_b2 packaged 1 built 1
sd15_off sd15_b2 off 16 built 1
sdxl_off_1thread sdxl_b2 off 1 built 1
sd15_pipeline20 pipeline20 packaged 16 built 1
sd15_pipeline20_decoder_apart pipeline20 packaged 16 built apart
sd15_pipeline4 pipeline4 packaged 16 built 1
sd15_pipeline4_decoder_apart pipeline4 packaged 16 built apart
ROWS
(( $# )) && ORDER=("$@")
for name in "${ORDER[@]}"; do  # before any device time is spent
    [ -n "${ROW[$name]:-}" ] || { echo "no row named $name (rows: ${!ROW[*]})"; exit 2; }
done

part install 120 python3 -m pip install --no-deps --no-build-isolation -q -e .
part versions 30 python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
# Built (or loaded) before the timed warm-ups, as in gpu_check: group_norm prefers it.
part cuda_ext 150 python3 -c "from fastdiff.ops import cuda_extension as e; \
print('CUDA extension available:', e.available(), e.unavailable_reason())"

if [ "${TUNE:-1}" != 0 ]; then
    part tune 240 env TRITON_CACHE_DIR="$SCRATCH/tune-cache" \
        python3 benchmarks/tune_attention.py --out "$OUT" --models sd15@64,sdxl@128
    for table in "$OUT"/sm_*.json; do
        [ -e "$table" ] && cp "$table" fastdiff/assets/attention_configs/
    done
fi

# The GPU tests before the timed rows (a budget cut takes rows, not tests): the attention tests
# with the new table in place, and the CUDA-graph runtime's (compile-ahead pass included).
if [ "${TUNE:-1}" != 0 ]; then
    part tests 150 python3 -m pytest -q -p no:cacheprovider tests/ops/test_attention_configs.py
    part gpu_tests 150 env FASTDIFF_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/ops/test_attention.py tests/ops/test_compile_ahead.py
fi
# CUDA graphs captured after the compile-ahead pass (the default since it was added), GraphedCall's
# probe inside it (the VAE graphs, the U-Net's): all of the runtime's GPU tests (35 s on the H200).
part gpu_runtime_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/runtime/test_gpu_runtime.py

for name in "${ORDER[@]}"; do
    read -r workload table threads extension ahead <<<"${ROW[$name]}"
    [ "$table" = packaged ] && table=""
    bench=(benchmarks/bench_unet.py --workloads "$workload")
    [[ "$workload" = pipeline* ]] && bench=(benchmarks/bench_pipeline.py --steps "${workload#pipeline}")
    build_dir=""
    [ "$extension" = none ] && build_dir="$SCRATCH/no-extension"
    decode_ahead=1
    [ "$ahead" = apart ] && ahead=1 && decode_ahead=0
    part "warmup_$name" 150 env TRITON_CACHE_DIR="$SCRATCH/cache-$name" \
        FASTDIFF_ATTENTION_CONFIGS="$table" FASTDIFF_COMPILE_THREADS="$threads" \
        FASTDIFF_COMPILE_AHEAD="$ahead" FASTDIFF_DECODE_AHEAD="$decode_ahead" \
        ${build_dir:+FASTDIFF_CUDA_BUILD_DIR="$build_dir"} \
        python3 "${bench[@]}" --providers fastdiff --note "$name" --csv "$OUT/warmup.csv"
done

grep -E "^=== .*(ok in|FAILED)|first call|wrote|^(sd15|sdxl|tiny)_" "$LOG"
echo "warmup check: ${FAILED:-all parts passed}"
[ -z "$FAILED" ]
