"""Pipeline.__call__'s plain-argument checks (fastdiff.pipeline.call_arguments)."""

import numpy as np
import pytest
import torch

from fastdiff.pipeline.call_arguments import (
    guidance_rescale_value,
    guidance_scale_value,
    make_generator,
)


@pytest.mark.parametrize("seed", [7, np.int64(7), np.uint32(7), torch.tensor(7), np.array(7)])
def test_integer_seeds_of_any_kind_are_accepted(seed):
    # int(torch.tensor(7)) seeded the generator before seeds were type-checked.
    generator = make_generator(seed, None, torch.device("cpu"))
    assert generator.initial_seed() == 7


@pytest.mark.parametrize("seed", [True, 7.0, "7", torch.tensor(7.0), torch.tensor(True)])
def test_seeds_that_are_not_integers_are_refused(seed):
    with pytest.raises(ValueError, match="seed must be an int"):
        make_generator(seed, None, torch.device("cpu"))


@pytest.mark.parametrize("value", [0.7, np.float32(0.7), torch.tensor(0.7), np.array(0.7)])
def test_guidance_values_of_any_numeric_kind_are_accepted(value):
    # guidance_rescale refused numpy and tensor scalars for a while; guidance_scale never did.
    assert guidance_rescale_value(value) == pytest.approx(0.7)
    assert guidance_scale_value(value) == pytest.approx(0.7)


@pytest.mark.parametrize("value", [True, "0.5", None, torch.tensor([0.5, 0.5])])
def test_guidance_rescale_that_is_not_a_number_is_refused(value):
    with pytest.raises(ValueError, match="guidance_rescale must be a number in"):
        guidance_rescale_value(value)
