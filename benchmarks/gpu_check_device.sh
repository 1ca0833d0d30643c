#!/usr/bin/env bash
# gpu_check.sh as one call of the device tool: a device call brings back at most 8 files from $OUT,
# and gpu_check.sh writes 8 and more, so it runs into a scratch folder and $OUT gets
#   gpu_check_all.tgz (every file), gpu_check.log, models_summary.txt, <gpu>.csv, models.csv and
#   backend_table.json;
# stdout gets each part's status, the failing tests and the model tables (the call's output tail).
#   run: bash benchmarks/gpu_check_device.sh   (carry .whl; timeout_s 520)
# TEST_JOBS (default here 10: a device machine has 16 cores) and TOTAL (default here 480, which
# leaves a 15-minute device budget room for a short rerun) pass through to gpu_check.sh.
set -u
OUT="${OUT:?set OUT to the folder to bring back (the device tool sets it)}"
export TEST_JOBS="${TEST_JOBS:-10}" TOTAL="${TOTAL:-480}"
SCRATCH="$(mktemp -d)"
bash "$(dirname "$0")/gpu_check.sh" "$SCRATCH" >"$SCRATCH/stdout.log" 2>&1
status=$?
tar -C "$SCRATCH" -czf "$OUT/gpu_check_all.tgz" .
for file in gpu_check.log models_summary.txt backend_table.json "$SCRATCH"/*.csv; do
    [ -e "$SCRATCH/${file##*/}" ] && cp "$SCRATCH/${file##*/}" "$OUT/"
done
grep -E "^=== .*(ok|FAILED|SKIPPED)|^FAILED |^ERROR " "$SCRATCH/gpu_check.log"
[ -e "$SCRATCH/models_summary.txt" ] && tail -n 60 "$SCRATCH/models_summary.txt"
exit $status
