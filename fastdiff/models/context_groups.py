"""A U-Net call with several contexts per sample: classifier-free guidance runs the U-Net on
``[x; x]`` with ``[uncond; cond]`` text contexts, and everything before the first
cross-attention sees the same input twice.

``UNet2DConditionModel.forward`` accepts ``encoder_hidden_states`` with ``k`` times the
sample's batch (the groups one after another, as ``[uncond; cond]``). Where the timestep and
the other time-embedding inputs are the sample's (SD 1.x / 2.x guidance), the U-Net runs its
blocks on the B samples until a transformer block's cross-attention first reads the context;
that block repeats its hidden states k times there, and the rest runs on the k·B rows as
usual. In SD1.5 that shares ``conv_in``, the first ResNet block and the first transformer
block's self-attention at 64x64 (the costliest attention of the step) between the two halves
of a guided batch. The result is the k·B-row call's: the same operations per sample, equal
up to the rounding of kernels that pick another algorithm at another batch.

Repeats, not broadcasts: the tensors that cross the point where the groups part (the block's
hidden states, its transformer's residual input, the skips saved before it and the timestep
embedding) are copied k times once, in their memory format.
"""

from __future__ import annotations

import torch


def repeat_batch(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``x`` repeated ``groups`` times along the batch, in ``x``'s memory format."""
    if groups == 1:
        return x
    return torch.cat([x] * groups)  # cat keeps its inputs' shared memory format


def context_batch(context) -> int | None:
    """The batch of a context: a tensor's, or a ``ContextProjections``' states'."""
    if context is None:
        return None
    states = getattr(context, "states", context)
    return states.shape[0]


def groups_of(batch: int, context) -> int:
    """How many contexts each of ``batch`` rows meets: 1 for a context of the same batch (or
    none), k for k times the batch. Any other batch is an error that names both."""
    rows = context_batch(context)
    if rows is None or rows == batch:
        return 1
    if batch > 0 and rows % batch == 0:
        return rows // batch
    raise ValueError(
        f"encoder_hidden_states has batch {rows}: it must be the sample's batch {batch} or a "
        f"multiple of it (that many contexts per sample, one group after another)"
    )


class GroupedEmbedding:
    """The timestep embedding of B samples that meet ``groups`` contexts each: the blocks that
    run on B rows take ``base``, those after the groups parted take it repeated to
    ``groups``·B rows, made once on first use. ``base`` is a tensor or a ``TimeShifts``."""

    def __init__(self, base, batch: int, groups: int) -> None:
        self.base = base
        self.batch = batch
        self.groups = groups
        self._repeated = None

    def for_batch(self, rows: int):
        if rows == self.batch:
            return self.base
        if rows != self.batch * self.groups:
            raise ValueError(
                f"a block ran on {rows} rows; the timestep embedding has {self.batch} "
                f"({self.groups} contexts per sample: {self.batch * self.groups} after they part)"
            )
        if self._repeated is None:
            repeat = getattr(self.base, "repeated", None)
            self._repeated = (
                repeat(self.groups) if repeat is not None else repeat_batch(self.base, self.groups)
            )
        return self._repeated
