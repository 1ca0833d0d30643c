"""Check, without a GPU, that ``kernels/launch_cache.py`` launches exactly what Triton would.

Each case runs on CPU tensors with Triton's driver replaced by ``triton_sm90.py``'s stub: kernels
compile for sm_90, and the compiled kernels' C launchers are replaced by a recorder of their
arguments. Every case is called three times: with the launch cache off (Triton's own launch path),
then on twice (the first call goes through Triton and is remembered, the second is launched from
the cache). For every launch the three calls must have called the same compiled kernel's launcher
with the same grid, stream, handle and metadata, the same scalars and constexprs (same types,
same values) and tensors of the same dtype, shape, strides, offset and 16-byte alignment; and the
third call must not have entered Triton's ``JITFunction.run`` at all (counted by its kernel-cache
key function).

Cases: every op of ``host_overhead.py`` at an SD1.5 shape (fp16); GroupNorm on an input, then on
the same shape 2 bytes further on (not 16-byte aligned: Triton compiles another kernel); attention
in fp32 (another config); attention at batch 3, then on its first two samples (the same strides:
only the grid differs); an up block's skip concatenation (cat_channels) and a ResNet block's end
(bias_residual); and whole forwards of
``narrow_sd15_unet`` (fp32 and fp16, ops routed as the auto backend routes them).

    python benchmarks/launch_cache_check.py     # exit status 1 on any difference
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_overhead  # noqa: E402
import torch  # noqa: E402
import triton.runtime.jit as jit_module  # noqa: E402
import triton_sm90  # noqa: E402  (starts the process again without TRITON_INTERPRET)
from fastdiff.kernels import launch_cache  # noqa: E402

from fastdiff import ops  # noqa: E402
from fastdiff.ops import use_backend  # noqa: E402


def extra_cases() -> list[tuple[str, Callable[[], object]]]:
    """Pairs of launches that differ only where a too-coarse signature would not look."""
    half = torch.float16
    storage = torch.empty(2 * 320 * 16 * 16 + 8, dtype=half)
    aligned = storage[:-8].view(2, 320, 16, 16)
    misaligned = storage[1:-7].view(2, 320, 16, 16)  # 2 bytes past a 16-byte boundary
    weight = torch.empty(320, dtype=half)
    q32, k32 = torch.empty(2, 8, 256, 40), torch.empty(2, 8, 77, 40)
    three = torch.empty(3, 8, 1024, 40, dtype=half)
    two = three[:2]  # the same strides: only the grid (batch × heads programs) differs
    up, skip = (
        torch.empty(2, channels, 32, 32, dtype=half, memory_format=torch.channels_last)
        for channels in (640, 320)
    )
    return [
        ("cat_channels 2x640+320x32x32 (an up block's skip)", lambda: ops.cat_channels(up, skip)),
        (
            "bias_residual 2x320x32x32 (a ResNet block's end)",
            lambda: ops.bias_residual(skip, skip, weight),
        ),
        (
            "group_norm 2x320x16x16, aligned then not",
            lambda: (
                ops.group_norm(aligned, 32, weight, weight),
                ops.group_norm(misaligned, 32, weight, weight),
            ),
        ),
        ("attention fp32 2x8x256x40, 77 keys", lambda: ops.attention(q32, k32, k32)),
        (
            "attention 3x8x1024x40 then 2x8x1024x40",
            lambda: (ops.attention(three, three, three), ops.attention(two, two, two)),
        ),
    ]


def unet_cases() -> list[tuple[str, Callable[[], object]]]:
    host_overhead.choose_as_auto()
    cases = []
    for dtype in (torch.float32, torch.float16):
        model, inputs = triton_sm90.prepared_unet("narrow_sd15_unet", 8, dtype)
        cases.append(
            (f"narrow_sd15_unet {dtype}", lambda model=model, inputs=inputs: model(**inputs))
        )
    return cases


def described(value) -> object:
    """What of a launcher argument must match: a tensor by its layout, the rest by type and
    value."""
    if isinstance(value, torch.Tensor):
        return (
            "tensor",
            value.dtype,
            value.shape,
            value.stride(),
            value.storage_offset(),
            value.data_ptr() % 16,
        )
    return (type(value), value)


def hooks(metadata, enter, exit_) -> str:
    """The launcher calls the launch hooks, when there are any, with the metadata: with none
    (None in Triton 3.6, an empty HookChain in 3.9) the three are unused."""
    if launch_cache.no_launch_hooks(enter, exit_):
        return "no launch hooks"
    return f"hooks {enter!r} {exit_!r}"


def launches(call: Callable[[], object], records: list) -> list[tuple]:
    records.clear()
    call()
    return [
        (launcher, (*args[:6], hooks(*args[6:9])), [described(a) for a in args[9:]])
        for launcher, args in records
    ]


def differences(label: str, reference: list, other: list, which: str) -> list[str]:
    if len(reference) != len(other):
        return [f"{label}: {which} made {len(other)} launches, Triton's path {len(reference)}"]
    found = []
    for index, (want, got) in enumerate(zip(reference, other, strict=True)):
        for part, name in (
            (0, "compiled kernel"),
            (1, "grid/stream/handle/metadata"),
            (2, "arguments"),
        ):
            if (want[part] is not got[part]) if part == 0 else (want[part] != got[part]):
                found.append(f"{label}: launch {index} ({want[0].name}): {which} differs in {name}")
    return found


def compare(label: str, call: Callable[[], object], records: list, entered: list) -> tuple:
    """(launches, launches made from the cache, problems) of one case."""
    with launch_cache.enabled(False):
        call()  # compiles (and autotunes) outside the comparison
        reference = launches(call, records)
    first = launches(call, records)
    entered.clear()
    second = launches(call, records)
    problems = differences(label, reference, first, "the first cached call")
    problems += differences(label, reference, second, "the cache's launch")
    if entered:
        problems.append(f"{label}: the cached call entered Triton {len(entered)} times")
    cached = 0 if entered else len(second)
    verdict = "identical" if not problems else f"{len(problems)} differences"
    print(f"{label:55s} {len(reference):4d} launches, {cached:4d} from the cache, {verdict}")
    return len(reference), cached, problems


def main() -> int:
    import fastdiff.ops.backend as backend

    backend.triton_can_run = lambda tensor: True  # CPU tensors stand in for CUDA ones
    # Every launch through Triton's JITFunction.run computes its kernel-cache key; replacing
    # JITFunction.run itself to count would turn the launch cache off (launch_cache's rule).
    entered = []
    real_key = jit_module.compute_cache_key

    def counting_key(*args, **kwargs):
        entered.append(1)
        return real_key(*args, **kwargs)

    results = []
    with torch.inference_mode(), use_backend("triton"), triton_sm90.launches_stubbed() as records:
        jit_module.compute_cache_key = counting_key
        try:
            for label, call, _ in host_overhead.cases():
                results.append(compare(label, call, records, entered))
            for label, call in extra_cases():
                results.append(compare(label, call, records, entered))
            # last: from here on every op is routed as the auto backend would route it
            for label, call in unet_cases():
                results.append(compare(label, call, records, entered))
        finally:
            jit_module.compute_cache_key = real_key
    total = sum(launched for launched, _, _ in results)
    cached = sum(from_cache for _, from_cache, _ in results)
    problems = [problem for _, _, found in results for problem in found]
    print(f"{total} launches compared, {cached} from the cache, {len(problems)} differences")
    for problem in problems:
        print("  " + problem)
    return 1 if problems or any(launched == 0 for launched, _, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
