"""The sampler against a naive per-row float64 reference (and transformers' logits warpers) of temperature,
top-k and top-p; seeded reproducibility; an empirical distribution test; SamplingParams validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from expertyard.engine.sampler import filter_logits, sample
from expertyard.engine.sampling_params import SamplingParams
from expertyard.errors import RequestError

MARGIN = 1e-5  # top-p cases whose cumulative mass lies this close to top_p depend on rounding: skipped


def reference(row: list[float], p: SamplingParams) -> tuple[dict[int, float], list[float]]:
    """Naive float64 temperature -> top-k -> top-p (OpenAI/HF semantics) of one row.

    Returns ({token: probability} of the allowed tokens, the cumulative masses at which top-p decides)."""
    t = p.temperature if p.temperature > 0 else 1.0
    z = [x / t for x in row]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    if p.top_k > 0:
        order = order[:p.top_k]
    m = max(z[i] for i in order)
    total = sum(math.exp(z[i] - m) for i in order)
    probs = {i: math.exp(z[i] - m) / total for i in order}
    kept, cum, sums = [], 0.0, []
    for i in order:  # the smallest prefix whose mass reaches top_p; at least one token
        sums.append(cum)
        if p.top_p == 1 or not kept or cum < p.top_p:
            kept.append(i)
        cum += probs[i]
    mass = sum(probs[i] for i in kept)
    return {i: probs[i] / mass for i in kept}, sums


def hf_reference(row: list[float], p: SamplingParams) -> set[int]:
    """Allowed tokens by transformers' warpers, in float64."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    x = torch.tensor([row], dtype=torch.float64) / (p.temperature if p.temperature > 0 else 1.0)
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(None, x)
    if p.top_p < 1:
        x = TopPLogitsWarper(p.top_p)(None, x)
    return set(torch.isfinite(x[0]).nonzero().flatten().tolist())


@st.composite
def batches(draw, max_rows=6):
    """(logits [N, V] float32 with distinct values per row, [SamplingParams] * N)."""
    v = draw(st.integers(2, 40))
    n = draw(st.integers(1, max_rows))
    rows, params = [], []
    for _ in range(n):  # distinct multiples of 0.01 in [-15, 15]: no ties, wide enough for tiny tails
        rows.append([x / 100 for x in draw(st.lists(st.integers(-1500, 1500), min_size=v, max_size=v, unique=True))])
        params.append(SamplingParams(
            temperature=draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.05, 5.0))),
            top_k=draw(st.one_of(st.just(0), st.integers(1, v + 2))),
            top_p=draw(st.one_of(st.just(1.0), st.floats(0.01, 1.0))),
        ))
    return torch.tensor(rows, dtype=torch.float32), params


def _unambiguous(logits, params):
    for row, p in zip(logits.tolist(), params):
        _, sums = reference(row, p)
        assume(p.top_p == 1 or all(abs(s - p.top_p) > MARGIN for s in sums))


@settings(max_examples=300, deadline=None)
@given(batches())
@example((torch.tensor([[13.06, 13.14]]), [SamplingParams(temperature=0.05)]))  # float32 logits ~260 after scaling
def test_filter_logits_support_and_probabilities_match_reference(batch):
    logits, params = batch
    _unambiguous(logits, params)
    out = filter_logits(logits, params)
    assert out.shape == logits.shape
    for r, (row, p) in enumerate(zip(logits.tolist(), params)):
        ref, _ = reference(row, p)
        allowed = set(torch.isfinite(out[r]).nonzero().flatten().tolist())
        assert allowed == set(ref), (p, row)
        assert allowed == hf_reference(row, p)
        t = p.temperature if p.temperature > 0 else 1.0
        idx = sorted(ref)
        torch.testing.assert_close(out[r, idx].double(), torch.tensor(row, dtype=torch.float64)[idx] / t,
                                   atol=1e-5, rtol=1e-5)
        probs = out[r].double().softmax(-1)
        expected = torch.zeros_like(probs)
        expected[idx] = torch.tensor([ref[i] for i in idx], dtype=torch.float64)
        # the scaled logits are float32: each is off by up to half an ulp, and a probability moves by the
        # error of its logit against the others' (e.g. logits ~13 at temperature 0.05 are ~260: ~3e-5 relative)
        scaled = max(abs(row[i]) / t for i in idx)
        torch.testing.assert_close(probs, expected, atol=1e-6, rtol=max(1e-5, 4 * 2.0 ** -24 * scaled))


@settings(max_examples=150, deadline=None)
@given(batches(), st.integers(0, 5))
def test_a_row_is_filtered_the_same_whatever_else_is_in_the_batch(batch, which):
    logits, params = batch
    r = which % len(params)
    alone = filter_logits(logits[r:r + 1], params[r:r + 1])
    assert torch.equal(filter_logits(logits, params)[r:r + 1], alone)


def test_top_p_one_keeps_the_tiny_tail_next_to_filtered_rows():
    logits = torch.tensor([[20.0, 0.0, -1.0, -5.0]] * 2)
    out = filter_logits(logits, [SamplingParams(top_p=1.0), SamplingParams(top_k=1)])
    assert torch.isfinite(out[0]).all()  # e^-20 is tiny but top_p=1 disables the filter
    assert torch.isfinite(out[1]).tolist() == [True, False, False, False]
    assert torch.isfinite(filter_logits(logits[:1], [SamplingParams(top_p=1.0, top_k=3)])).sum() == 3


@settings(max_examples=150, deadline=None)
@given(batches(), st.integers(0, 2**31 - 1))
def test_sample_picks_argmax_for_greedy_rows_and_an_allowed_token_otherwise(batch, seed):
    logits, params = batch
    _unambiguous(logits, params)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(params))]
    tokens = sample(logits.clone(), params, gens)
    assert tokens.shape == (len(params),) and tokens.dtype == torch.long
    for r, (row, p) in enumerate(zip(logits.tolist(), params)):
        if p.temperature == 0 or p.top_k == 1:
            assert tokens[r] == max(range(len(row)), key=row.__getitem__)
        else:
            assert int(tokens[r]) in reference(row, p)[0]


def test_seeded_rows_reproduce_across_batches():
    g = torch.Generator().manual_seed(0)
    v = 50
    target = SamplingParams(temperature=1.3, top_p=0.95, seed=7)
    steps = [torch.randn(v, generator=g) for _ in range(25)]

    def run(others: list[SamplingParams], seed: int, position: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        other_gens = [torch.Generator().manual_seed(100 + i) if o.seed is not None else None
                      for i, o in enumerate(others)]
        out = []
        for logits in steps:
            rows = [torch.randn(v, generator=g) for _ in others]
            rows.insert(position, logits)
            params = list(others)
            params.insert(position, target)
            gens = list(other_gens)
            gens.insert(position, gen)
            out.append(int(sample(torch.stack(rows), params, gens)[position]))
        return out

    alone = run([], seed=7, position=0)
    mixed = [SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=0), SamplingParams(top_k=5)]
    assert run(mixed, seed=7, position=2) == alone
    assert run(mixed[:1], seed=7, position=0) == alone
    assert run(mixed, seed=8, position=1) != alone  # a different seed draws differently
    assert len(set(alone)) > 5  # the draws are really random, not argmax


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (4, 0.9)])
def test_empirical_distribution_matches_analytic(top_k, top_p):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5])
    p = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
    expected, _ = reference(logits.tolist(), p)
    if (top_k, top_p) == (0, 1.0):  # the analytic softmax(logits / 0.7), computed independently
        w = [math.exp(x / 0.7) for x in logits.tolist()]
        assert expected == pytest.approx({i: x / sum(w) for i, x in enumerate(w)})
    else:  # top 4 renormalised = [.542, .265, .130, .064]: .542 + .265 = .807 < .9 <= .937, keep 3
        w = [math.exp(x / 0.7) for x in logits.tolist()[:3]]
        assert expected == pytest.approx({i: x / sum(w) for i, x in enumerate(w)})
    n = 4000
    gen = torch.Generator().manual_seed(1234)
    tokens = sample(logits.repeat(n, 1), [p] * n, [gen] * n)
    counts = torch.bincount(tokens, minlength=5).tolist()
    assert all(counts[i] == 0 for i in range(5) if i not in expected)
    chi2 = sum((counts[i] - n * q) ** 2 / (n * q) for i, q in expected.items())
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom at most, p = 0.001


@pytest.mark.parametrize("field, value", [
    ("temperature", float("nan")), ("temperature", -0.1),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")), ("top_p", -0.2),
    ("max_tokens", 0), ("max_tokens", -3),
    ("top_k", -1),
])
def test_invalid_sampling_params_raise_naming_the_field(field, value):
    with pytest.raises(RequestError, match=f"^{field}="):
        SamplingParams(**{field: value})


def test_valid_edge_sampling_params():
    p = SamplingParams(temperature=0, top_p=1.0, top_k=0, max_tokens=1)
    assert p.greedy
    assert SamplingParams(top_k=1).greedy and not SamplingParams(temperature=0.5).greedy
