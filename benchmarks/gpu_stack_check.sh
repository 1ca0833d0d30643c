#!/usr/bin/env bash
# The GPU machine's software on a CPU machine: before a GPU session spends device time, check the
# project against the torch and Triton versions installed there (torch 2.11 + cu130, Triton 3.6;
# CI and the developers' machines have newer ones). No GPU is needed; nothing here is timed.
#
#   bash benchmarks/gpu_stack_check.sh [OUT_DIR]      (default: runs/gpu_stack)
#   PYTHON=python3.12 bash benchmarks/gpu_stack_check.sh   (the GPU machine's Python)
#
# Steps, each reported ok/FAILED (exit status 1 when any failed):
#   venv      a virtual environment with torch==$TORCH, triton==$TRITON and the test dependencies
#             from PyPI (about 3 GB the first time; kept in $VENV and reused);
#   tests     the CPU test suite under TRITON_INTERPRET=1, as CI runs it;
#   sm90      benchmarks/triton_sm90.py --all-configs: every Triton kernel compiled for sm_90 by
#             this Triton (the report is written to OUT_DIR/triton_sm90-triton$TRITON.txt);
#   csrc      csrc/check_compile.sh against this torch's headers (needs nvcc; skipped without);
#   cuda-jit  the CUDA extension built and linked the way fastdiff builds it on first use, loaded,
#             its host-side argument errors raised on CPU tensors, and its GroupNorm launch plan
#             compared with the Python rule (cuda_support) on random inputs (needs nvcc);
#   cuda-aot  the same for the ahead-of-time build (FASTDIFF_BUILD_CUDA=1, setup.py build_ext) of a
#             copy of the working tree: fastdiff._C imported, errors raised (needs nvcc).
# The Triton 3.6 interpreter fails with numpy >= 2.4 ("only 0-dimensional arrays can be
# converted to Python scalars"), so the environment pins numpy below 2.4; the GPU path does not
# use the interpreter.
set -uo pipefail
OUTDIR="${1:-}"
# A relative OUT_DIR names a folder under the caller's working directory, taken before the cd.
[ -z "$OUTDIR" ] || [ "${OUTDIR#/}" != "$OUTDIR" ] || OUTDIR="$(pwd)/$OUTDIR"
cd "$(dirname "$0")/.."
REPO="$(pwd)"
TORCH="${TORCH:-2.11.0}"
TRITON="${TRITON:-3.6.0}"
PYTHON="${PYTHON:-python3}"  # the GPU machine runs Python 3.12
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
VENV="${VENV:-$HOME/.cache/fastdiff/venv-py$PY_VERSION-torch$TORCH-triton$TRITON}"
OUTDIR="${OUTDIR:-runs/gpu_stack}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="$VENV/bin/python"
failed=()

run() {  # run NAME COMMAND...: log to OUT_DIR/NAME.log, report ok/FAILED with the time taken
    local name="$1"
    shift
    local begin=$SECONDS
    if "$@" >"$OUTDIR/$name.log" 2>&1; then
        echo "== [$name] ok in $((SECONDS - begin)) s"
    else
        echo "== [$name] FAILED in $((SECONDS - begin)) s (log: $OUTDIR/$name.log)"
        tail -n 25 "$OUTDIR/$name.log"
        failed+=("$name")
        return 1
    fi
}

make_venv() {
    [ -x "$PY" ] || "$PYTHON" -m venv "$VENV" || return 1
    "$PY" -m pip install -q "torch==$TORCH" "triton==$TRITON" "numpy<2.4" ninja wheel \
        "setuptools>=64" || return 1
    "$PY" -m pip install -q safetensors pillow tqdm "pytest>=8" pytest-xdist hypothesis \
        "diffusers==0.42.1" "transformers>=4.40" peft scipy pytest-benchmark matplotlib || return 1
    # The repository itself, editable, into this environment only.
    "$PY" -m pip install -q --no-deps --no-build-isolation -e "$REPO" || return 1
    "$PY" -c "import torch, triton, fastdiff.kernels; print('torch', torch.__version__, \
'triton', triton.__version__, 'fastdiff from', fastdiff.kernels.__file__)"
}

cuda_home() {  # the toolkit folder (nvcc may be a wrapper script in /usr/local/bin)
    local nvcc
    nvcc="$(command -v nvcc || true)"
    for candidate in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$nvcc")")"; do
        if [ -n "$candidate" ] && [ -x "$candidate/bin/nvcc" ] && [ -d "$candidate/include" ]; then
            echo "$candidate"
            return
        fi
    done
}

cuda_extension_on_cpu() {  # cuda_extension_on_cpu jit|aot
    local build status
    build="$(mktemp -d)"
    if [ "$1" = aot ]; then
        # A copy of the tracked files as they are now; the build writes into the copy only.
        git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$build" || return 1
        (cd "$build" && CUDA_HOME="$(cuda_home)" TORCH_CUDA_ARCH_LIST=9.0 FASTDIFF_BUILD_CUDA=1 \
            "$PY" setup.py -q build_ext --inplace) || { rm -rf "$build"; return 1; }
    fi
    (cd "$build" && CUDA_HOME="$(cuda_home)" TORCH_CUDA_ARCH_LIST=9.0a \
        FASTDIFF_CUDA_BUILD_DIR="$build/jit" MODE="$1" "$PY" - <<'EOF'
import os

import torch

import fastdiff.ops.cuda_extension as ext

# available() needs a GPU; the build and the load do not.
if os.environ["MODE"] == "aot":
    import fastdiff._C

    print("imported", fastdiff._C.__file__)
else:
    ext._jit_build()
assert ext._ops_registered(), "built, but torch.ops.fastdiff_cuda was not registered"
ext._register_fakes()
cases = {
    "group_norm": lambda: torch.ops.fastdiff_cuda.group_norm(
        torch.randn(2, 1280, 32, 32, dtype=torch.float16), 32, None, None, 1e-5, True
    ),
    "sampler_step": lambda: torch.ops.fastdiff_cuda.sampler_step(
        torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.zeros(1, 10), None, None, None,
        7.5, None, None
    ),
}
for name, call in cases.items():
    try:
        call()
    except RuntimeError as error:
        message = str(error).splitlines()[0]
        assert "must be a CUDA tensor" in message, f"{name}: unexpected error: {message}"
        print(f"{name}: raised as expected: {message}")
    else:
        raise AssertionError(f"{name} accepted CPU tensors")
x = torch.empty(2, 4, 8, 8, device="meta")
print("fake group_norm:", tuple(torch.ops.fastdiff_cuda.group_norm(x, 2, None, None, 1e-5, True).shape))

# The launcher's plan (pure arithmetic, so CPU tensors may ask) against the Python rule that
# decides which inputs go to the extension: random shapes, dtypes, layouts and misalignments.
import random

from fastdiff.ops.cuda_support import group_norm_launch_plan

random.seed(0)
checked = 0
for _ in range(3000):
    dtype = random.choice([torch.float32, torch.float16, torch.bfloat16])
    batch, groups = random.choice([0, 1, 2, 3]), random.choice([1, 2, 4, 5, 8, 16, 32])
    channels = groups * random.choice([1, 2, 3, 4, 5, 8, 10, 16, 20, 40, 64, 80, 128, 160, 256])
    height, width = random.choice([1, 2, 3, 5, 7, 8, 16, 32, 64]), random.choice([1, 3, 8, 64])
    numel = batch * channels * height * width
    if numel > 4_000_000:
        continue
    offset = random.choice([0, 0, 1, 2, 3, 4, 8])  # elements: misaligns the start address
    storage = torch.empty(numel + offset, dtype=dtype)[offset:]
    if random.random() < 0.5:
        x = storage.view(batch, channels, height, width)
    else:
        x = storage.view(batch, height, width, channels).permute(0, 3, 1, 2)  # channels-last
    native = list(torch.ops.fastdiff_cuda.group_norm_plan(x, groups))
    mirrored = [int(value) for value in group_norm_launch_plan(x, groups)]
    assert native == mirrored, f"{tuple(x.shape)} {x.dtype} {x.stride()}: {native} != {mirrored}"
    checked += 1
print(f"group_norm_plan: the launcher and the Python rule agree on {checked} random inputs")
EOF
    )
    status=$?
    rm -rf "$build"
    return $status
}

run venv make_venv || { echo "gpu_stack_check: no environment, nothing else ran"; exit 1; }
run tests env TRITON_INTERPRET=1 "$PY" -m pytest -n 2 -q -p no:cacheprovider tests
run sm90 bash -c "'$PY' benchmarks/triton_sm90.py --all-configs > '$OUTDIR/triton_sm90-triton$TRITON.txt'"
if [ -n "$(cuda_home)" ]; then
    run csrc env PATH="$VENV/bin:$PATH" CUDA_HOME="$(cuda_home)" bash csrc/check_compile.sh
    run cuda-jit cuda_extension_on_cpu jit
    run cuda-aot cuda_extension_on_cpu aot
else
    echo "== [csrc, cuda-jit, cuda-aot] skipped: no nvcc (set CUDA_HOME)"
fi

if ((${#failed[@]})); then
    echo "gpu_stack_check: FAILED: ${failed[*]} (torch $TORCH, triton $TRITON)"
    exit 1
fi
echo "gpu_stack_check: all passed (torch $TORCH, triton $TRITON); logs in $OUTDIR"
