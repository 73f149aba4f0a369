"""moe_align's three paths, compiled, against the naive grouping of tests/test_moe_align.py."""

import pytest
import torch

from test_moe_align import CASES, check_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("bad_ids", [False, True])
def test_each_path_groups_as_the_naive_one(case, bad_ids):
    check_case("cuda", *case, bad_ids)
