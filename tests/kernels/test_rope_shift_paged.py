"""rope_shift_paged_: the Triton kernel reading tokens straight out of a paged source (the
host tier's slots, on CUDA through a device view) against its torch reference (gather, then
rope_shift_reference), on every paged layout: delta-0 tokens and V bit-exact, rotated K
within float tolerance, skipped destinations untouched."""


import pytest
import torch

from vllm_promptcache.kernels.rope_shift import (
    rope_shift_paged_reference, rope_shift_paged_triton)

from tests.kernels.test_rope_shift import (
    CASES, RTOL, bits, llama_inv_freq, make_cache, make_deltas, make_slots, read_slots)


# Run the Triton kernels interpreted (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.mark.parametrize("case", list(CASES))
def test_paged_source_matches_reference(case):
    layout, isa, dtype, H, D, rot, neox, N = CASES[case]
    torch.manual_seed(17)
    B_src, B_dst, T = 5, 6, 40
    src_raw, src_k, src_v = make_cache(layout, B_src, H, N, D, dtype, isa)
    src_raw.copy_(torch.randn(src_raw.shape).to(dtype))
    src_slots = torch.randint(0, B_src * N, (T,))
    dst_slots = make_slots(T, B_dst, N)
    delta = make_deltas(T)
    inv_freq = llama_inv_freq(rot)

    outs = []
    for impl in (rope_shift_paged_triton, rope_shift_paged_reference):
        raw, k, v = make_cache(layout, B_dst, H, N, D, dtype, isa)
        impl(src_k, src_v, src_slots, k, v, dst_slots, delta, inv_freq, rot, neox)
        outs.append((raw, k, v))
    (raw_t, k_t, v_t), (raw_r, k_r, v_r) = outs

    keep = dst_slots >= 0
    written = dst_slots[keep]
    assert torch.equal(bits(read_slots(v_t, written, H, D)), bits(read_slots(v_r, written, H, D)))
    kt, kr = read_slots(k_t, written, H, D), read_slots(k_r, written, H, D)
    same = delta[keep] == 0
    assert torch.equal(bits(kt[same]), bits(kr[same])), "delta 0 is a bit-exact copy"
    assert torch.equal(bits(kt[..., rot:]), bits(kr[..., rot:])), "non-rotary dims copied"
    err = (kt.float() - kr.float()).abs().max()
    assert float(err) <= 2 * RTOL[dtype] * float(kr.float().abs().max())
    # Every byte outside the written slots is still the NaN poison in both.
    poisoned = lambda r: r.isnan().sum()  # noqa: E731
    assert int(poisoned(raw_t)) == int(poisoned(raw_r))
