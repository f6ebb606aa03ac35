"""load_tokens_shifted: tokens saved to host slots by the real block saver, loaded at
other positions of another paged cache, checked through an independent packing of every
layout (itself checked against vLLM's cpu_attn_reshape_and_cache) and float64 RoPE."""

from types import SimpleNamespace

import pytest
import torch

from vllm_promptcache.kernels.block_copy import blocks_first, save_blocks_to_slots
from vllm_promptcache.kernels.shifted_load import host_as_layer, load_tokens_shifted

from tests.kernels.test_rope_shift import (
    RTOL, bits, llama_inv_freq, make_deltas, rope64)

NAN = float("nan")


# ------------------------------------------------- layouts, written out independently

def cpu_page_index(isa: str, N: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element positions of K[o, d] and V[o, d] ([N, D] each) inside one (block, head)
    page of 2*N*D elements of vLLM's CPU cache: K is the first half, V the second."""
    o = torch.arange(N)[:, None]
    d = torch.arange(D)[None, :]
    if isa in ("vec", "vec16"):
        k, v = d * N + o, o * D + d
    else:  # amx, 16-bit: csrc/cpu/cpu_attn_amx.hpp
        k = (o // 16) * 16 * D + (d // 2) * 32 + (o % 16) * 2 + d % 2
        v = (o // 2) * 32 + o % 2 + (d // 16) * 16 * N + (d % 16) * 2
    return k, N * D + v


def make_layer(layout, isa, B, H, N, D, dtype):
    """(raw storage, the KV tensor vLLM hands the connector, layout name), NaN-poisoned."""
    if layout == "flash_attn_legacy":
        raw = torch.full((2, B, N, H, D), NAN, dtype=dtype)
        return raw, raw, "flash_attn"
    if layout == "flash_attn_nhd":                       # logical BHNC, physical BNHC
        raw = torch.full((B, N, H, 2 * D), NAN, dtype=dtype)
        return raw, raw.permute(0, 2, 1, 3), "flash_attn"
    raw = torch.full((B, H, N, 2 * D), NAN, dtype=dtype)
    return raw, raw, layout


def write_kv(layout, isa, raw, k, v):
    """raw <- K/V given as [B, N, H, D]."""
    B, N, H, D = k.shape
    if layout == "flash_attn_legacy":
        raw[0], raw[1] = k, v
    elif layout == "flash_attn_nhd":
        raw[..., :D], raw[..., D:] = k, v
    elif layout == "flash_attn":
        raw[..., :D], raw[..., D:] = k.transpose(1, 2), v.transpose(1, 2)
    else:
        ki, vi = cpu_page_index(isa, N, D)
        pages = raw.view(B, H, 2 * N * D)
        pages[:, :, ki.flatten()] = k.permute(0, 2, 1, 3).reshape(B, H, N * D)
        pages[:, :, vi.flatten()] = v.permute(0, 2, 1, 3).reshape(B, H, N * D)


def read_kv(layout, isa, raw, H, N, D):
    """(K, V) as [B, N, H, D]."""
    if layout == "flash_attn_legacy":
        return raw[0], raw[1]
    if layout == "flash_attn_nhd":
        return raw[..., :D], raw[..., D:]
    if layout == "flash_attn":
        return raw[..., :D].transpose(1, 2), raw[..., D:].transpose(1, 2)
    B = raw.shape[0]
    ki, vi = cpu_page_index(isa, N, D)
    pages = raw.reshape(B, H, 2 * N * D)
    k = pages[:, :, ki.flatten()].reshape(B, H, N, D).transpose(1, 2)
    v = pages[:, :, vi.flatten()].reshape(B, H, N, D).transpose(1, 2)
    return k, v


def save_to_host(kv, num_blocks, slots):
    """Block i -> host slot slots[i] with the connector's own saver, into a HostBuffer-like
    layer view (rows strided: other layers' bytes sit around it)."""
    page_bytes = blocks_first(kv, num_blocks)[0].numel() * kv.element_size()
    buf = torch.randint(0, 256, (num_blocks, 32 + page_bytes + 16), dtype=torch.uint8)
    host = buf[:, 32:32 + page_bytes]
    save_blocks_to_slots(blocks_first(kv, num_blocks), torch.arange(num_blocks), host, slots)
    return buf, host


# id: (layout, isa, dtype, num_kv_heads, head_size, rotary_dim, neox, block_size)
CASES = {
    "fa-bf16-h2-neox": ("flash_attn", None, torch.bfloat16, 2, 64, 64, True, 16),
    "fa_nhd-fp32-h4-gptj": ("flash_attn_nhd", None, torch.float32, 4, 32, 32, False, 16),
    "fa_legacy-fp16-d48-rot32": ("flash_attn_legacy", None, torch.float16, 2, 48, 32, True, 16),
    "cpu_vec-fp32-neox": ("cpu", "vec", torch.float32, 2, 32, 32, True, 32),
    "cpu_vec16-bf16-d80-gptj": ("cpu", "vec16", torch.bfloat16, 2, 80, 80, False, 32),
    "cpu_amx-bf16-b128-tiny": ("cpu", "amx", torch.bfloat16, 2, 32, 32, True, 128),
    "cpu_amx-bf16-h3-d64-rot48": ("cpu", "amx", torch.bfloat16, 3, 64, 48, False, 32),
}
SRC_BLOCKS, DST_BLOCKS = 6, 5  # differ from every head count / size above (block_dim)


@pytest.fixture(params=["triton", "reference"])
def impl(request, monkeypatch):
    """rope_shift_ dispatches CPU tensors to the interpreted Triton kernel or the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "triton" else "0")
    return request.param


def setup_case(case) -> SimpleNamespace:
    """Random K/V in a source layer, saved block i -> host slot slot_of_block[i], and a
    NaN-poisoned destination layer."""
    layout, isa, dtype, H, D, rot, neox, N = CASES[case]
    c = SimpleNamespace(k=torch.randn(SRC_BLOCKS, N, H, D).to(dtype),
                        v=torch.randn(SRC_BLOCKS, N, H, D).to(dtype),
                        slot_of_block=torch.randperm(SRC_BLOCKS))
    src_raw, c.src_kv, c.layout = make_layer(layout, isa, SRC_BLOCKS, H, N, D, dtype)
    write_kv(layout, isa, src_raw, c.k, c.v)
    c.buf, c.host = save_to_host(c.src_kv, SRC_BLOCKS, c.slot_of_block)
    c.dst_raw, c.dst_kv, _ = make_layer(layout, isa, DST_BLOCKS, H, N, D, dtype)
    return c


@pytest.mark.parametrize("case", list(CASES))
def test_load_tokens_shifted_against_float64(case, impl, seed):
    layout, isa, dtype, H, D, rot, neox, N = CASES[case]
    msg = f"[{case} {impl} seed={seed}]"
    c = setup_case(case)
    buf_before = c.buf.clone()
    T = 40
    blk = torch.randint(0, SRC_BLOCKS, (T,))
    off = torch.randint(0, N, (T,))                            # anywhere inside a block
    dst = torch.randperm(DST_BLOCKS * N)[:T]
    skip = torch.rand(T) < 0.1
    skip[:4] = False                                            # make_deltas' fixed cases
    dst[skip] = -1
    delta = make_deltas(T)                                      # 0, negative, > 32k
    inv_freq = llama_inv_freq(rot)

    load_tokens_shifted(c.host, c.slot_of_block[blk], off, c.dst_kv, c.layout, H, D, N, dst,
                        delta, inv_freq, rot, neox, isa=isa)

    assert torch.equal(c.buf, buf_before), f"{msg} the host tier was written"
    ok = dst >= 0
    n = int(ok.sum())
    got_k, got_v = (x.reshape(DST_BLOCKS * N, H, D)[dst[ok]]
                    for x in read_kv(layout, isa, c.dst_raw, H, N, D))
    want_k, want_v = c.k[blk[ok], off[ok]], c.v[blk[ok], off[ok]]
    assert int((~c.dst_raw.isnan()).sum()) == 2 * n * H * D, f"{msg} wrote outside its slots"
    assert torch.equal(bits(got_v), bits(want_v)), msg
    zero = delta[ok] == 0
    assert zero.any()
    assert torch.equal(bits(got_k[zero]), bits(want_k[zero])), msg
    assert torch.equal(bits(got_k[..., rot:]), bits(want_k[..., rot:])), msg
    ref, scale = rope64(want_k, delta[ok], inv_freq, rot, neox)
    err = (got_k.double() - ref).abs() / scale.clamp_min(1e-30)
    assert float(err.max()) <= RTOL[dtype], f"{msg} max relative error {float(err.max()):.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_delta_zero_moves_whole_blocks_bit_exactly(case, impl, seed):
    """Every token of two saved blocks, delta 0, into two other blocks: the destination
    pages are byte-identical to the source pages, the other blocks untouched."""
    layout, isa, dtype, H, D, rot, neox, N = CASES[case]
    c = setup_case(case)
    src_blocks, dst_blocks = torch.tensor([4, 1]), torch.tensor([3, 0])
    off = torch.arange(N).repeat(2)
    blk = src_blocks.repeat_interleave(N)
    dst = dst_blocks.repeat_interleave(N) * N + off
    load_tokens_shifted(c.host, c.slot_of_block[blk], off, c.dst_kv, c.layout, H, D, N, dst,
                        torch.zeros(2 * N, dtype=torch.int64), llama_inv_freq(rot), rot, neox,
                        isa=isa)
    bd = 1 if c.dst_kv.dim() == 5 else 0
    for s, d in zip(src_blocks.tolist(), dst_blocks.tolist()):
        assert torch.equal(bits(c.dst_kv.select(bd, d)), bits(c.src_kv.select(bd, s))), \
            f"[{case} {impl} seed={seed}]"
    others = [b for b in range(DST_BLOCKS) if b not in dst_blocks.tolist()]
    assert c.dst_kv.movedim(bd, 0)[others].isnan().all()


@pytest.mark.parametrize("layout", ["flash_attn", "flash_attn_nhd", "flash_attn_legacy", "cpu"])
def test_host_as_layer_views_saved_blocks_in_place(layout):
    raw, kv, _ = make_layer(layout, "vec", 3, 2, 16, 32, torch.bfloat16)
    raw.copy_(torch.randn(raw.shape))
    buf, host = save_to_host(kv, 3, torch.tensor([2, 0, 1]))
    view = host_as_layer(host, kv)
    bd = 1 if kv.dim() == 5 else 0
    assert view.shape == kv.shape
    assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # no copy
    for block, slot in ((0, 2), (1, 0), (2, 1)):
        assert torch.equal(bits(view.select(bd, slot)), bits(kv.select(bd, block)))


@pytest.mark.parametrize("isa", ["vec", "vec16", "amx"])
def test_cpu_packing_oracle_matches_vllm(isa, seed):
    """The test's own CPU packing (write_kv) is what vLLM's reshape_and_cache writes."""
    from vllm import _custom_ops as ops  # noqa: F401  (loads torch.ops._C)

    if not hasattr(torch.ops._C, "cpu_attn_reshape_and_cache"):
        pytest.skip("vLLM CPU ops not built")
    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("no AMX tiles on this CPU: vLLM's AMX op cannot run")
    dtype, H, D, N, B = {"vec": (torch.float32, 2, 32, 32, 3),
                         "vec16": (torch.bfloat16, 2, 80, 32, 3),
                         "amx": (torch.bfloat16, 3, 64, 128, 2)}[isa]
    k = torch.randn(B, N, H, D).to(dtype)
    v = torch.randn(B, N, H, D).to(dtype)
    ours, _, _ = make_layer("cpu", isa, B, H, N, D, dtype)
    write_kv("cpu", isa, ours, k, v)
    theirs = torch.full_like(ours, NAN)
    key_cache, value_cache = theirs.view(B, H, 2 * N, D).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k.reshape(B * N, H, D), v.reshape(B * N, H, D), key_cache,
                                   value_cache, torch.arange(B * N), isa)
    assert torch.equal(bits(ours), bits(theirs)), f"[{isa} seed={seed}]"
    rk, rv = read_kv("cpu", isa, theirs, H, N, D)
    assert torch.equal(bits(rk), bits(k)) and torch.equal(bits(rv), bits(v))


def test_rejects_bad_inputs():
    dtype, H, D, N = torch.bfloat16, 2, 32, 16
    _, kv, _ = make_layer("flash_attn", None, 3, H, N, D, dtype)
    host = torch.zeros(4, N * H * 2 * D * 2, dtype=torch.uint8)
    args = dict(kv_layer=kv, layout="flash_attn", num_kv_heads=H, head_size=D, block_size=N,
                dst_slot_mapping=torch.tensor([0]), delta=torch.tensor([5]),
                inv_freq=torch.ones(D // 2), rotary_dim=D, is_neox_style=True)
    with pytest.raises(ValueError, match="host layer"):
        load_tokens_shifted(host[:, :-2], torch.tensor([0]), torch.tensor([0]), **args)
    with pytest.raises(IndexError, match="src_offsets"):
        load_tokens_shifted(host, torch.tensor([0]), torch.tensor([-1]), **args)
    with pytest.raises(IndexError, match="src_slots"):
        load_tokens_shifted(host, torch.tensor([4]), torch.tensor([0]), **args)
