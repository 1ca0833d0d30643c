#!/usr/bin/env bash
# CI compile check for the CUDA extension: no GPU needed, nothing is run.
#   1. every .cu file is compiled with `nvcc -arch=sm_90 -c` and torch's nvcc flags (syntax,
#      templates, ptxas for Hopper);
#   2. the binding .cpp files are syntax-checked with g++ against the installed torch headers,
#      when torch is importable (a CPU wheel ships the headers; its one missing CUDA-build header,
#      c10/cuda/impl/cuda_cmake_macros.h, is stood in for by a one-line file in a temp folder).
# Usage: csrc/check_compile.sh [SOURCE_DIR]   (default: the folder of this script)
# Exit status: 0 when everything compiled or nvcc is absent (skipped, with a message);
#              1 when any file fails to compile.
set -uo pipefail

source_dir="${1:-$(cd "$(dirname "$0")" && pwd)}"
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$nvcc" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    nvcc="$CUDA_HOME/bin/nvcc"
fi
if [[ -z "$nvcc" ]]; then
    echo "check_compile: SKIPPED - nvcc not found (set NVCC or CUDA_HOME to check the CUDA sources)"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=0
start=$SECONDS

shopt -s nullglob
cuda_sources=("$source_dir"/*.cu)
cpp_sources=("$source_dir"/*.cpp)
if (( ${#cuda_sources[@]} == 0 )); then
    echo "check_compile: FAILED - no .cu files in $source_dir"
    exit 1
fi

# The flags torch.utils.cpp_extension passes to nvcc (its COMMON_NVCC_FLAGS) and ours, so the
# check sees what the real build sees (e.g. no implicit half <-> float conversions).
nvcc_flags=(-arch=sm_90 -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
for source in "${cuda_sources[@]}"; do
    name="$(basename "$source")"
    if "$nvcc" "${nvcc_flags[@]}" -c "$source" -o "$work/${name%.cu}.o" \
        >"$work/$name.log" 2>&1; then
        echo "check_compile: ok      $name"
    else
        echo "check_compile: FAILED  $name"
        cat "$work/$name.log"
        failed=1
    fi
done

# Include paths of the installed torch, one per line (empty when torch is not importable).
torch_includes="$(python3 - <<'EOF' 2>/dev/null
import sysconfig

from torch.utils.cpp_extension import include_paths

for path in include_paths():
    print(path)
print(sysconfig.get_paths()["include"])
EOF
)"
if (( ${#cpp_sources[@]} > 0 )); then
    if [[ -z "$torch_includes" ]]; then
        echo "check_compile: skipped the binding syntax check - torch is not importable"
    else
        flags=(-std=c++17 -fsyntax-only -Wall -Wextra -DTORCH_EXTENSION_NAME=_C)
        # The CUDA runtime headers: next to nvcc, or where CUDA_HOME or the default install says
        # (nvcc may be a wrapper script in another folder, as in /usr/local/bin).
        for cuda_root in "$(dirname "$(dirname "$(readlink -f "$nvcc")")")" "${CUDA_HOME:-}" \
            /usr/local/cuda; do
            if [[ -n "$cuda_root" && -f "$cuda_root/include/cuda_runtime.h" ]]; then
                flags+=(-isystem "$cuda_root/include")
                break
            fi
        done
        first_include="$(head -n 1 <<<"$torch_includes")"
        if [[ ! -f "$first_include/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
            mkdir -p "$work/shim/c10/cuda/impl"
            echo "#define C10_CUDA_BUILD_SHARED_LIBS" >"$work/shim/c10/cuda/impl/cuda_cmake_macros.h"
            flags+=(-isystem "$work/shim")
        fi
        while IFS= read -r include; do
            flags+=(-isystem "$include")
        done <<<"$torch_includes"
        for source in "${cpp_sources[@]}"; do
            name="$(basename "$source")"
            if g++ "${flags[@]}" "$source" >"$work/$name.log" 2>&1; then
                echo "check_compile: ok      $name (g++ syntax check against torch headers)"
            else
                echo "check_compile: FAILED  $name"
                cat "$work/$name.log"
                failed=1
            fi
        done
    fi
fi

echo "check_compile: $(( SECONDS - start )) s"
if (( failed )); then
    echo "check_compile: FAILED - see the errors above"
    exit 1
fi
exit 0
