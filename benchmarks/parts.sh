# Sourced by the GPU check scripts (gpu_check.sh, gpu_check_cuda.sh, gpu_warmup_device.sh):
#   part NAME LIMIT_S CMD...   one part of a check: tee'd into $LOG, bounded in time by `timeout`,
#                              a failure added to $FAILED (the script goes on with the next part).
# With TOTAL set (seconds for the whole script, against bash's SECONDS), each part's limit is cut
# to 10 s less than what is left (timeout's --kill-after) and parts are skipped once less than
# 20 s is left, so that a script ends on its own, with its files written, rather than being
# killed part-way by the device call's limit.

left() { echo $(( ${TOTAL:?} - SECONDS )); }

part() {
    local name="$1" limit="$2" begin=$SECONDS
    shift 2
    if [[ -n "${TOTAL:-}" ]]; then
        if (( $(left) < 20 )); then
            echo "=== [$name] SKIPPED: the ${TOTAL} s budget is spent" | tee -a "$LOG"
            FAILED="$FAILED $name(skipped)"
            return 0
        fi
        (( limit > $(left) - 10 )) && limit=$(( $(left) - 10 ))
    fi
    echo "=== [$name] $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}  # the part's, not tee's (whether or not pipefail is set)
    if (( status == 0 )); then
        echo "=== [$name] ok in $((SECONDS - begin)) s" | tee -a "$LOG"
    else
        echo "=== [$name] FAILED (exit $status) after $((SECONDS - begin)) s" | tee -a "$LOG"
        FAILED="$FAILED $name"
    fi
}
