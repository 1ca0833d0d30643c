"""Pipeline.__call__'s plain-argument checks (fastdiff.pipeline.call_arguments)."""

import numpy as np
import pytest
import torch

from fastdiff.pipeline.call_arguments import make_generator


@pytest.mark.parametrize("seed", [7, np.int64(7), np.uint32(7), torch.tensor(7), np.array(7)])
def test_integer_seeds_of_any_kind_are_accepted(seed):
    # int(torch.tensor(7)) seeded the generator before seeds were type-checked.
    generator = make_generator(seed, None, torch.device("cpu"))
    assert generator.initial_seed() == 7


@pytest.mark.parametrize("seed", [True, 7.0, "7", torch.tensor(7.0), torch.tensor(True)])
def test_seeds_that_are_not_integers_are_refused(seed):
    with pytest.raises(ValueError, match="seed must be an int"):
        make_generator(seed, None, torch.device("cpu"))
