"""The compiled Triton decode attention against the float64 loop at real model shapes, eagerly and after CUDA-graph
replays with new lengths and slots; and `Attention.forward` / MLA decode steps on CUDA (kernel) against the CPU
(SDPA path)."""

import pytest
import torch

if not torch.cuda.is_available():  # CPU machines (CI) may have no triton at all
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from expertyard.config import AttentionConfig  # noqa: E402
from expertyard.engine.cuda_graph import capture  # noqa: E402
from expertyard.kernels.decode_attention import decode_attention, kernel_supports  # noqa: E402
from expertyard.layers import attention as attention_module  # noqa: E402
from expertyard.layers.attention import Attention  # noqa: E402
from expertyard.layers.attention_metadata import AttentionMetadata, PrefillSpan  # noqa: E402
from expertyard.layers.mla import MultiHeadLatentAttention  # noqa: E402
from expertyard.layers.rotary import RotaryEmbedding  # noqa: E402

from test_decode_attention import make_case, reference, relative_error  # noqa: E402

# B = sequences, H = query heads, G = KV heads, Dk/Dv = head dims, L = cache length, T = tokens, D = hidden

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}  # max |error| / max |ref|

SHAPES = {  # (H, G, Dk, Dv, V a view of K as absorbed MLA passes it)
    "qwen3-30b-a3b": (32, 4, 128, 128, False),
    "mixtral": (32, 8, 128, 128, False),
    "olmoe": (16, 16, 128, 128, False),
    "mla-like": (16, 1, 576, 512, True),
}


def batch(kind: str, seed: int = 0) -> tuple[list[int], int]:
    """(lengths, cache length L). mixed: few sequences of every length class, long cache (split-K); wide: a
    decode batch of 64 over a short cache (no split for G >= 4); b1-4k: one sequence filling a 4k cache."""
    if kind == "mixed":
        return [1, 15, 16, 17, 300, 1000, 2047, 4096], 4096
    if kind == "wide":
        gen = torch.Generator().manual_seed(seed)
        return [1, 512] + torch.randint(1, 513, (62,), generator=gen).tolist(), 512
    assert kind == "b1-4k"
    return [4096], 4096


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["mixed", "wide", "b1-4k"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernel_matches_reference(shape, kind, dtype):
    h, g, dk, dv, latent = SHAPES[shape]
    lens, cache_len = batch(kind)
    c = make_case(lens, h, g, dk, dv, dtype, cache_len, latent, device="cuda")
    assert kernel_supports(c["q"], c["k_cache"], c["v_cache"])
    out = decode_attention(**c)
    assert out.shape == (len(lens), h, dv) and out.dtype == dtype
    err = relative_error(out, reference(**c))
    assert err < TOL[dtype], f"max |error| / max |ref| = {err:.2e}"


@pytest.mark.parametrize("window", [1, 100, 4096])
def test_sliding_window(window):
    lens, cache_len = batch("mixed")
    c = make_case(lens, 32, 8, 128, 128, torch.bfloat16, cache_len, device="cuda")
    err = relative_error(decode_attention(**c, window=window), reference(**c, window=window))
    assert err < TOL[torch.bfloat16], f"max |error| / max |ref| = {err:.2e}"


def test_output_into_a_slice():
    """_attend passes out[n0:] of a step's output (prefill rows first)."""
    c = make_case([5, 17, 300], 32, 4, 128, 128, torch.bfloat16, device="cuda")
    full = torch.full((7, 32, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    decode_attention(**c, out=full[4:])
    assert full[:4].isnan().all()
    assert relative_error(full[4:], reference(**c)) < TOL[torch.bfloat16]


def test_steps_compile_nothing_new():
    """Per-step values (lengths, slots, batch size, the offset of the decode rows in the step's tensors) select
    no new compiled kernels once both grids (with and without split-K) have run: Triton would compile mid-serving."""
    from expertyard.kernels.decode_attention_triton import _decode_kernel, _reduce_kernel

    if not hasattr(_decode_kernel, "device_caches"):
        pytest.skip("this triton keeps its compiled kernels elsewhere")

    def compiled() -> int:
        return sum(len(caches[0]) for fn in (_decode_kernel, _reduce_kernel) for caches in fn.device_caches.values())

    h, g, d, dtype = 32, 4, 128, torch.bfloat16
    lens, cache_len = batch("wide")
    c = make_case(lens, h, g, d, d, dtype, cache_len, device="cuda")
    q, slots, ctx = c["q"], c["slots"], c["context_lens"]
    out = torch.empty(len(lens), h, d, dtype=dtype, device="cuda")
    decode_attention(q, c["k_cache"], c["v_cache"], slots, ctx, c["scale"], out=out)  # no split (B*G >= SMs)
    decode_attention(q[:2], c["k_cache"], c["v_cache"], slots[:2], ctx[:2], c["scale"], out=out[:2])  # split-K
    before = compiled()
    for n0, b in [(1, 63), (3, 40), (0, 1), (5, 3), (7, 17), (2, 33)]:  # odd offsets: other pointer alignments
        ctx[n0:n0 + b] = torch.randint(1, cache_len + 1, (b,), device="cuda")
        rows = slice(n0, n0 + b)
        decode_attention(q[rows], c["k_cache"], c["v_cache"], slots[rows], ctx[rows], c["scale"], out=out[rows])
        ref = reference(q[rows], c["k_cache"], c["v_cache"], slots[rows], ctx[rows], c["scale"])
        assert relative_error(out[rows], ref) < TOL[dtype]
    assert compiled() == before


@pytest.mark.parametrize("kind", ["b1-4k", "mixed", "wide"])  # split-K grids (b1-4k, mixed) and one without
@pytest.mark.parametrize("shape", ["qwen3-30b-a3b", "mla-like"])
def test_cuda_graph_replays_see_new_lengths_and_slots(shape, kind):
    """One capture, replays after writing other lengths (down to 1, up to L), slots, queries and cache contents
    into the static inputs: the kernel reads lengths on the device, and its grid depends on shapes only."""
    h, g, dk, dv, latent = SHAPES[shape]
    dtype = torch.bfloat16
    lens, cache_len = batch(kind)
    static = make_case(lens, h, g, dk, dv, dtype, cache_len, latent, device="cuda")
    graph, out = capture(lambda: decode_attention(**static), None, torch.cuda.Stream())
    for seed in range(1, 4):
        gen = torch.Generator().manual_seed(seed)
        new_lens = torch.randint(1, cache_len + 1, (len(lens),), generator=gen)
        new_lens[0] = 1 if seed % 2 else cache_len
        new = make_case(new_lens.tolist(), h, g, dk, dv, dtype, cache_len, latent, seed=seed, device="cuda")
        for name in ("q", "k_cache", "slots", "context_lens") + (() if latent else ("v_cache",)):
            static[name].copy_(new[name])
        out.fill_(float("nan"))  # poison: the replay must write every element
        graph.replay()
        torch.cuda.synchronize()
        err = relative_error(out, reference(**static))
        assert err < TOL[dtype], f"replay {seed}: max |error| / max |ref| = {err:.2e}"


def _gqa(window):
    cfg = AttentionConfig(kind="gqa", num_heads=32, num_kv_heads=4, head_dim=128, softmax_scale=128**-0.5,
                          qk_norm="per_head", sliding_window=window)
    return Attention(cfg, hidden_size=512, eps=1e-6), 128


def _mla(window):
    cfg = AttentionConfig(kind="mla", num_heads=16, num_kv_heads=1, head_dim=192, softmax_scale=192**-0.5,
                          kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    return MultiHeadLatentAttention(cfg, hidden_size=512, eps=1e-6), 64


@pytest.mark.parametrize("layer,window", [(_gqa, None), (_gqa, 64), (_mla, None)], ids=["gqa", "gqa-window", "mla"])
def test_attention_forward_on_cuda_matches_cpu(layer, window, monkeypatch):
    """A step of one prefill span and five decode tokens through the layer: CUDA (decode rows by the kernel)
    against the CPU (SDPA), float32, from the same weights and cache history."""
    torch.manual_seed(0)
    module, rope_dim = layer(window)
    for p in module.parameters():  # per-head norms too: not all ones
        p.data.uniform_(-0.1, 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    rope = RotaryEmbedding(1.0 / 10000 ** (torch.arange(0, rope_dim, 2).float() / rope_dim), 1.0,
                           module.cfg.rope_style)
    lens, n0, prefill_slot = torch.tensor([1, 17, 64, 200, 300]), 4, 7
    slots = torch.tensor([3, 0, 5, 1, 6])
    meta = AttentionMetadata(token_slots=torch.cat((torch.full((n0,), prefill_slot), slots)),
                             positions=torch.cat((torch.arange(n0), lens - 1)),
                             prefills=[PrefillSpan(slot=prefill_slot, start=0, length=n0, offset=0)],
                             num_prefill_tokens=n0, decode_slots=slots, decode_context_lens=lens,
                             decode_max_len=int(lens.max()))
    cache = [torch.randn(8, 320, *shape) for shape in module.kv_cache_shapes()]  # [S, L, ...] history
    x = torch.randn(n0 + len(lens), 512)  # [T, D]

    cos, sin = rope.cos_sin(meta.positions)
    want = module(x, meta, [t.clone() for t in cache], rope, cos, sin)  # [T, D]

    def no_sdpa(*args):
        raise AssertionError("the decode rows took the SDPA path on CUDA")

    monkeypatch.setattr(attention_module, "_decode_sdpa", no_sdpa)
    module, rope = module.cuda(), rope.cuda()
    meta_cuda = AttentionMetadata(
        token_slots=meta.token_slots.cuda(), positions=meta.positions.cuda(), prefills=meta.prefills,
        num_prefill_tokens=n0, decode_slots=slots.cuda(), decode_context_lens=lens.cuda(),
        decode_max_len=meta.decode_max_len)
    cos, sin = rope.cos_sin(meta_cuda.positions)
    got = module(x.cuda(), meta_cuda, [t.cuda() for t in cache], rope, cos, sin)
    err = ((got.cpu() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, f"max |error| / max |ref| = {err:.2e}"
