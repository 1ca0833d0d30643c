#!/usr/bin/env bash
# Where there is network (a developer machine): download the wheels that the GPU machine, which
# has none, needs for the diffusers comparisons (tests and model benchmarks) into .whl/. Then run
# gpu_check.sh on the GPU machine with `carry: [".whl"]`; it installs them (carried_wheels.sh).
# The GPU machine runs Python 3.12; both wheels are pure Python.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 importlib_metadata
ls -l .whl/
