"""Fused ops: one public function per op. Models call these and nothing below them.

Each op module holds the public function, its fp32 ``*_reference`` and its eager path; the
backend (eager / triton / cuda) is chosen in ``fastdiff.ops.backend``. The sampler step's
reference is the sampling layer's ``apply_plan_row`` (ops sit below sampling).
"""

from fastdiff.ops.attention import attention, attention_reference
from fastdiff.ops.backend import BACKENDS, compile_ahead, select_backend, use_backend
from fastdiff.ops.bias_residual import bias_residual, bias_residual_reference
from fastdiff.ops.cat_channels import cat_channels, cat_channels_reference
from fastdiff.ops.conv3x3 import conv3x3, conv3x3_reference
from fastdiff.ops.geglu import geglu, geglu_reference
from fastdiff.ops.group_norm import group_norm, group_norm_reference
from fastdiff.ops.layer_norm import (
    add_layer_norm,
    add_layer_norm_reference,
    layer_norm,
    layer_norm_reference,
)
from fastdiff.ops.linear_geglu import linear_geglu, linear_geglu_reference
from fastdiff.ops.sampler_step import sampler_step, sampler_step_eager

__all__ = [
    "BACKENDS",
    "add_layer_norm",
    "add_layer_norm_reference",
    "attention",
    "attention_reference",
    "bias_residual",
    "bias_residual_reference",
    "cat_channels",
    "cat_channels_reference",
    "compile_ahead",
    "conv3x3",
    "conv3x3_reference",
    "geglu",
    "geglu_reference",
    "group_norm",
    "group_norm_reference",
    "layer_norm",
    "layer_norm_reference",
    "linear_geglu",
    "linear_geglu_reference",
    "sampler_step",
    "sampler_step_eager",
    "select_backend",
    "use_backend",
]
