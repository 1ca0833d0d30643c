"""A nearest-neighbour 2x upsampling followed by a 3x3 convolution, as one convolution over the
small map (``Upsample2D`` under ``ModelBase.fold_upsampling``).

Every output pixel of ``conv3x3(nearest2x(x))`` sees at most a 2x2 window of ``x``: of the 3x3
taps around output row ``2i``, the top one falls on input row ``i - 1`` and the other two on
row ``i``; around row ``2i + 1``, the top two fall on ``i`` and the bottom one on ``i + 1``
(columns alike). The taps that land on one input pixel can be added up beforehand, so each of
the four output phases ``(2i + a, 2j + b)`` is a 2x2 convolution of ``x`` with summed weights:
4 multiply-adds per output pixel and input channel instead of 9, and the 4x-larger upsampled
map is never written. Two ways to run it:

* ``"transposed"``: one transposed convolution, stride 2, padding 1, with a 4x4 kernel (its
  rows, top to bottom: ``w2``, ``w1 + w2``, ``w0 + w1``, ``w0`` for the 3x3 rows ``w0..w2``;
  columns alike). PyTorch's ``conv_transpose2d`` (cuDNN's strided data-gradient kernels on a
  GPU) writes the interleaved output directly.
* ``"phases"``: one 2x2 convolution (padding 1) with 4x the output channels, one block per
  phase, over an (H + 1) x (W + 1) grid; a strided copy then interleaves the phases into the
  2H x 2W output and adds the bias.

Both compute the same sums as the checkpoint's two steps, with the summed weights rounded once
to the weight's dtype. Which is faster on a GPU (and whether either beats the two steps) is
for ``benchmarks/bench_upsample.py`` to say, per shape: under ``"auto"`` (``optimize()``'s
default) each call runs the way the measured backend table (``fastdiff.ops.autoselect``, op
``upsample``) found fastest at its input's shape, and the two steps where nothing was measured.

The summed weights are derived from the convolution's own weight and kept beside it
(``FoldedWeight``). They are derived again, into the same memory, whenever that weight is
replaced or changed in place (its version counter: fusing a LoRA does that), so captured
graphs, which read the derived weights' memory, see the change once the runtime has derived
them again (``ModelBase.refresh_folded_weights``, called by ``OptimizedRuntime`` before every
denoise, decode and encode) ahead of a replay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff.ops import autoselect
from fastdiff.ops.backend import strictly_nhwc

MODES = ("transposed", "phases")
AUTO = "auto"  # per call, the mode measured fastest at the input's shape (measured_mode)
TWO_STEPS = "eager"  # the auto table's name for the unfolded path (F.interpolate, then conv)

# Which 3x3 rows (or columns) each tap of the folded kernels adds up: the 4x4 transposed
# kernel's taps from top to bottom, then each phase's 2x2 taps (phase 0 = even output rows).
TRANSPOSED_TAPS = ((2,), (1, 2), (0, 1), (0,))
PHASE_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))


def check_mode(mode: str | None) -> None:
    if mode is not None and mode != AUTO and mode not in MODES:
        raise ValueError(f"upsample_fold must be one of {[None, AUTO, *MODES]}, got {mode!r}")


def measured_mode(x: torch.Tensor) -> str | None:
    """The fold the backend table measured fastest for an upsampler whose input is shaped like
    ``x`` (its shape, dtype and layout: ``autoselect.upsample_key``), or None for the two
    steps, which is also the answer where nothing was measured near it."""
    choice = autoselect.cached_preference("upsample", autoselect.upsample_key(x))
    return None if choice == TWO_STEPS else choice


def tap_sum(weight: torch.Tensor, sources, dim: int) -> torch.Tensor:
    """The sum of ``weight``'s slices ``sources`` along ``dim`` (that dimension dropped)."""
    total = weight.select(dim, sources[0])
    for index in sources[1:]:
        total = total + weight.select(dim, index)
    return total


def fold_taps(weight: torch.Tensor, row_taps, col_taps) -> torch.Tensor:
    """(O, I, len(row_taps), len(col_taps)) kernel whose tap (p, q) is the sum of the 3x3
    ``weight``'s taps in rows ``row_taps[p]`` and columns ``col_taps[q]``, in float32 (float64
    for a float64 weight). Slices and additions only, on the weight's device (nothing a CUDA
    graph capture refuses)."""
    source = weight.to(torch.promote_types(weight.dtype, torch.float32))
    rows = torch.stack([tap_sum(source, taps, 2) for taps in row_taps], dim=2)
    return torch.stack([tap_sum(rows, taps, 3) for taps in col_taps], dim=3)


def transposed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``conv_transpose2d``'s (I, O, 4, 4) weight for a 3x3 ``weight`` (O, I, 3, 3), its dtype."""
    return fold_taps(weight, TRANSPOSED_TAPS, TRANSPOSED_TAPS).transpose(0, 1).to(weight.dtype)


def phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (4·O, I, 2, 2) weight of the four phases' 2x2 convolutions, phase ``2a + b`` (output
    row parity a, column parity b) in output channels ``[(2a + b)·O, (2a + b + 1)·O)``."""
    blocks = [fold_taps(weight, PHASE_TAPS[a], PHASE_TAPS[b]) for a in (0, 1) for b in (0, 1)]
    return torch.cat(blocks).to(weight.dtype)


def derive(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """The folded weight of ``mode`` in ``weight``'s dtype, device and memory format."""
    folded = transposed_weight(weight) if mode == "transposed" else phase_weight(weight)
    layout = torch.channels_last if strictly_nhwc(weight) else torch.contiguous_format
    return folded.contiguous(memory_format=layout)


def interleave_phases(z: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 2H x 2W output from the phases' (N, 4·C, H + 1, W + 1) convolution ``z`` (plus
    ``bias``): output pixel (2i + a, 2j + b) is phase 2a + b at (i + a, j + b). One strided
    copy (with the bias added in it); the output keeps ``z``'s memory format."""
    batch, channels4, rows, cols = z.shape
    channels, height, width = channels4 // 4, rows - 1, cols - 1
    s0, s1, s2, s3 = z.stride()
    # (n, c, i, a, j, b) -> z[n, (2a + b)·C + c, i + a, j + b]: affine in every index.
    phases = z.as_strided(
        (batch, channels, height, 2, width, 2),
        (s0, s1, s2, 2 * channels * s1 + s2, s3, channels * s1 + s3),
    )
    memory_format = torch.channels_last if strictly_nhwc(z) else torch.contiguous_format
    shape = (batch, channels, 2 * height, 2 * width)
    if torch.is_grad_enabled() and (z.requires_grad or (bias is not None and bias.requires_grad)):
        # Differentiable ops (out= is not): a fresh (N, C, H, 2, W, 2) tensor is NCHW's order.
        sums = phases if bias is None else phases + bias.view(channels, 1, 1, 1, 1)
        return sums.reshape(shape).contiguous(memory_format=memory_format)
    out = torch.empty(shape, dtype=z.dtype, device=z.device, memory_format=memory_format)
    t0, t1, t2, t3 = out.stride()
    target = out.as_strided(
        (batch, channels, height, 2, width, 2), (t0, t1, 2 * t2, t2, 2 * t3, t3)
    )
    if bias is None:
        target.copy_(phases)
    else:
        torch.add(phases, bias.view(channels, 1, 1, 1, 1), out=target)
    return out


def upsample_conv(
    x: torch.Tensor, folded: torch.Tensor, bias: torch.Tensor | None, mode: str
) -> torch.Tensor:
    """``conv3x3(nearest2x(x))`` from the folded weight of ``mode`` (``derive``)."""
    if mode == "transposed":
        return F.conv_transpose2d(x, folded, bias, stride=2, padding=1)
    return interleave_phases(F.conv2d(x, folded, None, padding=1), bias)


class FoldedWeight:
    """A convolution weight's folded form, derived again when the weight changes.

    The derived tensor is kept while the source keeps its identity, storage, dtype, device and
    version counter; after an in-place change (a LoRA fused into it, ``load_state_dict``) it is
    derived again into the same memory, so a captured graph reading it stays valid. An edit
    through ``weight.data`` does not move the version counter: ``forget`` (which
    ``ModelBase.fold_upsampling`` and ``refresh_folded_weights(force=True)`` call) is how the
    caller says so. Not a
    parameter or buffer: the state dict stays the checkpoint's, and ``module.to(...)`` leaves it
    to be derived again at the next call."""

    def __init__(self, mode: str):
        check_mode(mode)
        self.mode = mode
        self.key: tuple | None = None
        self.tensor: torch.Tensor | None = None

    @staticmethod
    def source_key(weight: torch.Tensor) -> tuple | None:
        """What identifies ``weight``'s values; None where its changes cannot be tracked (an
        inference-mode tensor has no version counter; wrapped in a Parameter it reads 0
        whatever is written to it)."""
        if weight.is_inference():
            return None
        try:
            version = weight._version
        except RuntimeError:
            return None
        return (id(weight), weight.data_ptr(), version, weight.dtype, weight.device, weight.shape)

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The folded weight for ``weight``'s current values; None if they cannot be tracked."""
        key = self.source_key(weight)
        if key is None:
            return None
        if key != self.key:
            # A normal tensor even when called under torch.inference_mode: an inference tensor
            # could not be written in place outside it, when the weight changes again.
            with torch.inference_mode(False), torch.no_grad():
                folded = derive(weight.detach(), self.mode)
                same_memory = (
                    self.tensor is not None
                    and self.tensor.shape == folded.shape
                    and self.tensor.dtype == folded.dtype
                    and self.tensor.device == folded.device
                    and self.tensor.stride() == folded.stride()
                )
                if same_memory:
                    self.tensor.copy_(folded)
                else:
                    self.tensor = folded
            self.key = key
        return self.tensor

    def forget(self) -> None:
        """Derive the folded weight again at the next ``get`` (into the same memory), whatever
        the source's key says: an edit through ``weight.data`` leaves the version counter as
        it was, so only the caller can know."""
        self.key = None

    def nbytes(self) -> int:
        return 0 if self.tensor is None else self.tensor.numel() * self.tensor.element_size()
