"""moe_align's three paths, compiled, against the naive grouping of tests/test_moe_align.py."""

import pytest
import torch

from test_moe_align import CASES, check_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("bad_ids", [False, True])
@pytest.mark.parametrize("pairs", [False, True])
def test_each_path_groups_as_the_naive_one(case, bad_ids, pairs, monkeypatch):
    monkeypatch.setenv("EXPERTYARD_MOE_ALIGN_PAIRS", "1" if pairs else "0")  # off: its cases take three kernels
    check_case("cuda", *case, bad_ids)
