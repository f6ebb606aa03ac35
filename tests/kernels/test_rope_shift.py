"""rope_shift: the Triton kernel (interpreter mode, on CPU tensors) and the torch reference
against an independent float64 computation, on every paged layout; the CPU layouts against
vLLM's own cpu_attn_reshape_and_cache; and RoPE shift equivalence with vLLM's get_rope."""

import os

import pytest
import torch

from vllm_promptcache.kernels import rope_shift as rs
from vllm_promptcache.kernels.rope_shift import (
    paged_kv_views, rope_shift_, rope_shift_reference)


# Run the Triton kernels interpreted (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("triton_interpreter")

# Relative to each rotated pair's magnitude: float32 compute error (~1e-7), plus for 16-bit
# outputs half an ulp of rounding (<= 2**-8 of the value for bf16, 2**-11 for fp16).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.05 * 2.0 ** -8, torch.float16: 2.0 ** -10}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
IMPLS = {"triton": rope_shift_, "reference": rope_shift_reference}


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(INT_VIEW[x.dtype])


def rope64(k: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, rot: int, neox: bool):
    """Float64 RoPE of k [T, H, D] at positions pos [T]; also each element's pair magnitude."""
    k = k.double()
    ang = pos.double()[:, None] * inv_freq.double()[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    r = k[..., :rot]
    if neox:
        x1, x2 = r[..., : rot // 2], r[..., rot // 2:]
    else:
        x1, x2 = r[..., 0::2], r[..., 1::2]
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    mag = (x1 * x1 + x2 * x2).sqrt()
    if neox:
        out, scale = torch.cat((o1, o2), -1), torch.cat((mag, mag), -1)
    else:
        out = torch.stack((o1, o2), -1).flatten(-2)
        scale = torch.stack((mag, mag), -1).flatten(-2)
    return torch.cat((out, k[..., rot:]), -1), torch.cat((scale, k[..., rot:].abs()), -1)


def make_cache(layout: str, B: int, H: int, N: int, D: int, dtype, isa=None):
    """NaN-poisoned raw KV tensor of one layer and its (dst_k, dst_v) views."""
    nan = float("nan")
    if layout == "flash_attn_legacy":            # (2, blocks, block, heads, dim)
        raw = torch.full((2, B, N, H, D), nan, dtype=dtype)
        kv = raw
        layout = "flash_attn"
    elif layout == "flash_attn_nhd":             # vLLM 0.32 logical BHNC, physical BNHC
        raw = torch.full((B, N, H, 2 * D), nan, dtype=dtype)
        kv = raw.permute(0, 2, 1, 3)
        layout = "flash_attn"
    else:                                        # flash_attn (LBHNC) or cpu
        raw = torch.full((B, H, N, 2 * D), nan, dtype=dtype)
        kv = raw
    k, v = paged_kv_views(kv, layout, H, D, N, isa=isa)
    return raw, k, v


def read_slots(view: torch.Tensor, slots: torch.Tensor, H: int, D: int) -> torch.Tensor:
    """view[slot] as [n, H, D] for a 4-D or 6-D paged view."""
    if view.dim() == 4:
        N = view.shape[1]
        return view[slots // N, slots % N]
    tg = view.shape[2]
    N = view.shape[1] * tg
    b, o = slots // N, slots % N
    return view[b, o // tg, o % tg].reshape(len(slots), H, D)


def make_slots(T: int, B: int, N: int) -> torch.Tensor:
    """A run of T tokens starting at a non-block-aligned offset, through a shuffled block
    table, with some tokens skipped (-1)."""
    start = int(torch.randint(1, N, ()))
    pos = torch.arange(start, start + T)
    table = torch.randperm(B)
    slots = table[pos // N] * N + pos % N
    skip = torch.rand(T) < 0.15
    skip[1] = True
    skip[0] = skip[2] = skip[3] = skip[4] = False
    return torch.where(skip, torch.full_like(slots, -1), slots)


def make_deltas(T: int) -> torch.Tensor:
    kind = torch.randint(0, 4, (T,))
    small = torch.randint(-4000, 4000, (T,))
    big = torch.randint(32_768, 200_000, (T,))
    delta = torch.where(kind == 0, torch.zeros_like(small),
                        torch.where(kind == 1, small, torch.where(kind == 2, big, -big)))
    delta[:4] = torch.tensor([0, 40_000, -50_000, -7])  # always: zero, >32k, negative
    return delta


def llama_inv_freq(rot: int, base: float = 10000.0) -> torch.Tensor:
    # Perturbed so nothing can rely on a particular formula: the kernel must use the table.
    inv = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    return (inv * (1 + 0.1 * torch.rand(rot // 2, dtype=torch.float64))).float()


# id: (layout, isa, dtype, num_kv_heads, head_size, rotary_dim, neox, block_size)
CASES = {
    "fa_legacy-fp32-d48-neox": ("flash_attn_legacy", None, torch.float32, 3, 48, 48, True, 16),
    "fa_legacy-bf16-d80-rot32-gptj": ("flash_attn_legacy", None, torch.bfloat16, 2, 80, 32, False,
                                      16),
    "fa-fp32-d80-gqa4-gptj": ("flash_attn", None, torch.float32, 4, 80, 80, False, 16),
    "fa_nhd-bf16-d64-h8-rot16-neox": ("flash_attn_nhd", None, torch.bfloat16, 8, 64, 16, True, 32),
    "fa_nhd-fp16-d48-h2-gptj": ("flash_attn_nhd", None, torch.float16, 2, 48, 48, False, 16),
    "cpu_vec-fp32-d32-rot16-neox": ("cpu", "vec", torch.float32, 2, 32, 16, True, 32),
    "cpu_vec16-bf16-d80-gptj": ("cpu", "vec16", torch.bfloat16, 2, 80, 80, False, 32),
    "cpu_amx-bf16-d32-b128-neox": ("cpu", "amx", torch.bfloat16, 2, 32, 32, True, 128),
    "cpu_amx-bf16-d64-rot48-gptj": ("cpu", "amx", torch.bfloat16, 3, 64, 48, False, 32),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CASES))
def test_rope_shift_against_float64(case, impl, seed):
    layout, isa, dtype, H, D, rot, neox, N = CASES[case]
    T, B = 40, 5
    msg = f"[{case} {impl} seed={seed}]"
    src_k = torch.randn(T, H, D).to(dtype)
    src_v = torch.randn(T, H, D).to(dtype)
    slots = make_slots(T, B, N)
    delta = make_deltas(T)
    inv_freq = llama_inv_freq(rot)
    raw, dst_k, dst_v = make_cache(layout, B, H, N, D, dtype, isa)

    IMPLS[impl](src_k, src_v, dst_k, dst_v, slots, delta, inv_freq, rot, neox)

    ok = slots >= 0
    n = int(ok.sum())
    got_k = read_slots(dst_k, slots[ok], H, D)
    got_v = read_slots(dst_v, slots[ok], H, D)
    # Exactly the written elements lost their poison: untouched slots are still NaN.
    assert not got_k.isnan().any() and not got_v.isnan().any(), msg
    assert int((~raw.isnan()).sum()) == 2 * n * H * D, msg

    # V, K of delta-0 tokens and K's non-rotary tail are bit-exact copies.
    assert torch.equal(bits(got_v), bits(src_v[ok])), msg
    zero = delta[ok] == 0
    assert zero.any(), msg
    assert torch.equal(bits(got_k[zero]), bits(src_k[ok][zero])), msg
    assert torch.equal(bits(got_k[..., rot:]), bits(src_k[ok][..., rot:])), msg

    want, scale = rope64(src_k[ok], delta[ok], inv_freq, rot, neox)
    err = (got_k.double() - want).abs() / scale.clamp_min(1e-30)
    assert float(err.max()) <= RTOL[dtype], f"{msg} max relative error {float(err.max()):.3g}"


@pytest.mark.parametrize("isa", ["vec", "vec16", "amx", "auto"])
def test_cpu_layout_matches_vllm_reshape_and_cache(isa, seed):
    """Delta-0 rope_shift into the CPU backend's layer tensor writes exactly the bytes
    vLLM's own cpu_attn_reshape_and_cache writes (same views the backend's forward uses)."""
    from vllm import _custom_ops as ops

    if not hasattr(torch.ops._C, "cpu_attn_reshape_and_cache"):
        pytest.skip("vLLM CPU ops not built")
    H, N, T = 2, 128, 48
    dtype, D = {"vec": (torch.float32, 32), "vec16": (torch.bfloat16, 80),
                "amx": (torch.bfloat16, 64), "auto": (torch.bfloat16, 32)}[isa]
    if isa == "auto":  # the observed layer: (blocks, 2, 128, 64) bf16, strides (16384, 8192, 64, 1)
        isa_used = rs._cpu_isa(dtype, N, D)
    else:
        isa_used = isa
    if isa_used == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("no AMX tiles on this CPU: vLLM's AMX op cannot run")
    B = 3
    src_k = torch.randn(T, H, D).to(dtype)
    src_v = torch.randn(T, H, D).to(dtype)
    slots = make_slots(T, B, N)
    ref = torch.full((B, H, N, 2 * D), float("nan"), dtype=dtype)
    if isa == "auto":
        assert ref.stride() == (H * N * 2 * D, N * 2 * D, 2 * D, 1)
    key_cache, value_cache = ref.view(B, H, 2 * N, D).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(src_k, src_v, key_cache, value_cache, slots, isa_used)

    for name, impl in IMPLS.items():
        raw = torch.full_like(ref, float("nan"))
        k, v = paged_kv_views(raw, "cpu", H, D, N, isa=None if isa == "auto" else isa)
        impl(src_k, src_v, k, v, slots, torch.zeros(T, dtype=torch.int64),
             torch.ones(D // 2), D, True)
        assert torch.equal(bits(raw), bits(ref)), f"[{isa}->{isa_used} {name} seed={seed}]"


# --------------------------------------------------------- equivalence with vLLM's RoPE

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
ROPES = {  # id: (head_size, max_position, is_neox_style, rope_parameters)
    "llama-d32": (32, 4096, True, {"rope_type": "default", "rope_theta": 10000.0}),
    "llama-d32-gptj": (32, 4096, False, {"rope_type": "default", "rope_theta": 10000.0}),
    "llama3-scaled-d64": (64, 131072, True, LLAMA3),
}


@pytest.fixture(scope="module")
def vllm_ropes():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        return {name: get_rope(hs, maxpos, neox, params, torch.float32)
                for name, (hs, maxpos, neox, params) in ROPES.items()}


def rope_inv_freq(rope) -> torch.Tensor:
    """The frequencies the vLLM rotary embedding object itself uses."""
    inv_freq = rope._compute_inv_freq(rope.base).float()
    half = rope.rotary_dim // 2
    # ... and they are the ones its cos/sin cache was built from (position 1).
    torch.testing.assert_close(rope.cos_sin_cache[1, :half], inv_freq.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(rope.cos_sin_cache[1, half:], inv_freq.sin(), atol=1e-6, rtol=0)
    return inv_freq


def shift(impl, k, delta, inv_freq, rot, neox):
    T, H, D = k.shape
    raw, dst_k, dst_v = make_cache("flash_attn", 2, H, 16, D, k.dtype)
    slots = torch.arange(3, 3 + T)
    IMPLS[impl](k, k, dst_k, dst_v, slots, torch.full((T,), delta), inv_freq, rot, neox)
    return read_slots(dst_k, slots, H, D)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(ROPES))
def test_shift_equals_rope_at_offset(vllm_ropes, name, impl, seed):
    """RoPE(k, 0..n-1) shifted by p == RoPE(k, p..p+n-1), for p beyond 32k (float64 truth)."""
    rope = vllm_ropes[name]
    inv_freq = rope_inv_freq(rope)
    if name.startswith("llama3"):
        plain = 1.0 / LLAMA3["rope_theta"] ** (
            torch.arange(0, rope.rotary_dim, 2, dtype=torch.float) / rope.rotary_dim)
        assert (inv_freq < plain * 0.5).any() and (inv_freq == plain).any()  # scaling is on
    n, H, rot, neox = 12, 2, rope.rotary_dim, rope.is_neox_style
    p = int(torch.randint(32_769, 120_000, ()))
    k_raw = torch.randn(n, H, rope.head_size, dtype=torch.float64)
    at0, _ = rope64(k_raw, torch.arange(n), inv_freq, rot, neox)
    atp, scale = rope64(k_raw, torch.arange(p, p + n), inv_freq, rot, neox)
    got = shift(impl, at0.float(), p, inv_freq, rot, neox)
    err = (got.double() - atp).abs() / scale.clamp_min(1e-30)
    assert float(err.max()) < 1e-5, f"[{name} {impl} p={p} seed={seed}] {float(err.max()):.3g}"


@pytest.mark.parametrize("name", list(ROPES))
def test_shift_matches_vllm_rotary_forward(vllm_ropes, name, seed):
    """Against vLLM's own RotaryEmbedding.forward_native (its float32 cos/sin cache, so
    positions are kept < 2k where that cache is accurate to ~1e-5)."""
    rope = vllm_ropes[name]
    inv_freq = rope_inv_freq(rope)
    n, H, D = 12, 2, rope.head_size
    p = int(torch.randint(100, 2000, ()))
    k_raw = torch.randn(n, H * D)
    pos0 = torch.arange(n)
    at0 = rope.forward_native(pos0, torch.zeros_like(k_raw), k_raw.clone())[1].view(n, H, D)
    atp = rope.forward_native(pos0 + p, torch.zeros_like(k_raw), k_raw.clone())[1].view(n, H, D)
    got = shift("triton", at0, p, inv_freq, rope.rotary_dim, rope.is_neox_style)
    err = (got - atp).abs().max() / atp.abs().max()
    assert float(err) < 2e-4, f"[{name} p={p} seed={seed}] {float(err):.3g}"


def test_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(rs, "rope_shift_triton", lambda *a: calls.append("triton"))
    monkeypatch.setattr(rs, "rope_shift_reference", lambda *a: calls.append("reference"))
    args = (torch.zeros(1, 1, 2),) * 4 + (torch.zeros(1, dtype=torch.int64),) * 2 + (
        torch.ones(1), 2, True)
    rs.rope_shift_(*args)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rs.rope_shift_(*args)
    assert calls == ["triton", "reference"]


@pytest.mark.parametrize("runs", [1, 3, 200])
def test_cpu_rotation_in_runs_and_chunks_matches_float64(runs, seed):
    """The CPU path rotates per run of equal delta, in chunks of ROTATE_CHUNK_VALUES,
    and falls back to per-token angles past MAX_DELTA_RUNS runs: all three agree with
    the float64 formula, over more tokens than one chunk."""
    from kernels.rope_shift import MAX_DELTA_RUNS, ROTATE_CHUNK_VALUES, _rotated

    H, D, rot = 2, 64, 48
    T = 2 * (ROTATE_CHUNK_VALUES // (H * rot)) + 300
    k = torch.randn(T, H, D).to(torch.bfloat16)
    cuts = sorted(torch.randperm(T - 1)[:runs - 1].add(1).tolist())
    delta = torch.zeros(T, dtype=torch.int64)
    for i, (a, b) in enumerate(zip([0] + cuts, cuts + [T])):
        delta[a:b] = 0 if i % 3 == 1 else int(torch.randint(-60_000, 60_000, ()))
    assert (runs > MAX_DELTA_RUNS) == (int((delta[1:] != delta[:-1]).sum()) + 1 > MAX_DELTA_RUNS)
    inv_freq = llama_inv_freq(rot)
    for neox in (True, False):
        got = _rotated(k, delta, inv_freq, rot, neox)
        zero = delta == 0
        assert torch.equal(bits(got[zero]), bits(k[zero]))
        assert torch.equal(bits(got[..., rot:]), bits(k[..., rot:]))
        want, scale = rope64(k, delta, inv_freq, rot, neox)
        err = (got.double() - want).abs() / scale.clamp_min(1e-30)
        assert float(err.max()) <= RTOL[torch.bfloat16], f"runs={runs} neox={neox}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_rotation_leaves_its_sources_alone_unless_they_are_scratch(dtype, seed):
    """The CPU path rotates float32 copies of each chunk: a float32 source (whose
    `.float()` would be itself) is not written, and rotating a scratch copy in place
    gives the same bits as rotating into a new tensor."""
    from kernels.rope_shift import ROTATE_CHUNK_VALUES, _rotated

    H, D, rot = 2, 64, 48
    T = ROTATE_CHUNK_VALUES // (H * rot) + 77
    k = torch.randn(T, H, D).to(dtype)
    before = k.clone()
    delta = torch.full((T,), 12_345, dtype=torch.int64)
    delta[:40] = 0
    inv_freq = llama_inv_freq(rot)
    for neox in (True, False):
        fresh = _rotated(k, delta, inv_freq, rot, neox)
        assert torch.equal(bits(k), bits(before))
        scratch = k.clone()
        in_place = _rotated(scratch, delta, inv_freq, rot, neox, in_place=True)
        assert in_place.data_ptr() == scratch.data_ptr()
        assert torch.equal(bits(in_place), bits(fresh))
        assert not torch.equal(bits(fresh[40:, :, :rot]), bits(k[40:, :, :rot]))
