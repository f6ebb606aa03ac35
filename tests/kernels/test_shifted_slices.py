"""The CPU slice path of shifted loads (kernels/shifted_slices.py): runs of tokens laid
out as a real load lays them out -- modules and gaps at new positions, cut anywhere
inside blocks -- are moved bit for bit as the per-token path moves them, and as
float64 RoPE says, on every layout; and a plan is a few groups per run, not a step
per token."""

import numpy as np
import pytest
import torch

from tests.kernels.test_rope_shift import RTOL, bits, llama_inv_freq, rope64
from tests.kernels.test_shifted_load import CASES, make_layer, read_kv, save_to_host, write_kv
from vllm_promptcache.kernels import shifted_slices
from vllm_promptcache.kernels.rope_shift import paged_kv_views, rope_shift_paged_reference
from vllm_promptcache.kernels.shifted_load import host_as_layer, load_tokens_shifted
from vllm_promptcache.kernels.shifted_slices import plan_slices

SRC_BLOCKS, DST_BLOCKS = 23, 29


def layout_of_a_load(rng: np.random.Generator, N: int):
    """Token sources and destinations as the scheduler plans them: stored runs (whole
    host blocks, tokens from offset 0) placed as runs at new positions of a prompt, with
    gaps of a few tokens between them, runs that start and end mid-block, one run moved
    by a whole number of blocks, a short run, a source block used twice at two deltas,
    and a few skipped destinations (-1)."""
    src_slots, src_offsets, dst, deltas = [], [], [], []
    free_dst = rng.permutation(DST_BLOCKS)
    pos = int(rng.integers(0, N))  # the prompt position of the next run
    stored = {0: [3, 7, 1], 1: [10, 4], 2: [15, 16, 2, 20]}  # run -> its host slots
    plan = [(0, 5, 2 * N + 3), (1, 0, N + N // 2), (2, N - 1, 3 * N - 2), (0, 1, 2),
            (1, 0, 3), (0, 0, N + 1)]
    for i, (run, src_start, n) in enumerate(plan):
        if i == 5:  # a whole number of blocks after its source position
            pos = src_start + N * (-(-(pos - src_start) // N) + int(rng.integers(0, 2)))
        slots = stored[run]
        t = np.arange(src_start, src_start + n)
        src_slots.append(np.asarray(slots)[t // N])
        src_offsets.append(t % N)
        p = pos + np.arange(n)
        dst.append(free_dst[p // N] * N + p % N)
        deltas.append(np.full(n, pos - src_start))
        pos += n + int(rng.integers(1, 6))  # a label between modules
    src_slots, src_offsets, dst, deltas = (np.concatenate(a) for a in
                                           (src_slots, src_offsets, dst, deltas))
    assert dst.max() < DST_BLOCKS * N and len(set(dst.tolist())) == len(dst)
    dst[rng.choice(len(dst), 3, replace=False)] = -1
    return src_slots, src_offsets, dst, deltas


def setup_layers(case, rng):
    layout, isa, dtype, H, D, rot, neox, N = CASES[case]
    k = torch.randn(SRC_BLOCKS, N, H, D).to(dtype)
    v = torch.randn(SRC_BLOCKS, N, H, D).to(dtype)
    k[0, :3] = -0.0  # delta-0 tokens must keep their sign bits
    src_raw, src_kv, name = make_layer(layout, isa, SRC_BLOCKS, H, N, D, dtype)
    write_kv(layout, isa, src_raw, k, v)
    slot_of_block = torch.from_numpy(rng.permutation(SRC_BLOCKS))
    buf, host = save_to_host(src_kv, SRC_BLOCKS, slot_of_block)
    block_of_slot = torch.argsort(slot_of_block)
    return k, v, block_of_slot, host, name


@pytest.mark.parametrize("max_runs", [5, 16])
@pytest.mark.parametrize("case", list(CASES))
def test_slices_move_what_the_per_token_path_moves_bit_for_bit(case, max_runs, rng,
                                                               monkeypatch):
    # 6 runs, cut into up to 9 by the skipped destinations: all of them as slices (16),
    # or the 5 longest, the rest per token.
    plan, dst, msg = check_a_planned_load(
        case, rng, monkeypatch,
        lambda args, N, inv_freq, dtype: plan_slices(*args, N, inv_freq, max_runs=max_runs))
    assert (plan.rest.dst_slots.numel() > 0) == (max_runs == 5), msg
    assert plan.sliced_tokens + plan.rest.dst_slots.numel() == (dst >= 0).sum(), msg
    assert any(g.dst_block is not None for g in plan.groups), msg  # copied by view


def check_a_planned_load(case, rng, monkeypatch, make_plan):
    """A load of `case` laid out as the scheduler lays it out (`layout_of_a_load`), moved
    on the CPU path with the plan `make_plan(args, N, inv_freq, dtype)` builds, leaves the
    per-token path's bytes and the sources' K/V at every destination.  Returns (the plan,
    the destinations, a message naming the case and seed) for the plan's own checks."""
    np_rng, seed = rng
    layout, isa, dtype, H, D, rot, neox, N = CASES[case]
    msg = f"[{case} seed={seed}]"
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU path
    k, v, block_of_slot, host, name = setup_layers(case, np_rng)
    src_slots, src_offsets, dst, deltas = layout_of_a_load(np_rng, N)
    inv_freq = llama_inv_freq(rot)
    args = [torch.from_numpy(a) for a in (src_slots, src_offsets, dst, deltas)]
    plan = make_plan(args, N, inv_freq, dtype)
    ours_raw, ours_kv, _ = make_layer(layout, isa, DST_BLOCKS, H, N, D, dtype)
    load_tokens_shifted(host, args[0], args[1], ours_kv, name, H, D, N, args[2], args[3],
                        inv_freq, rot, neox, isa=isa, plan=plan)
    # NaN-poisoned destinations: equal bits also say nothing was written elsewhere.
    assert torch.equal(bits(ours_raw), bits(per_token_layer(case, host, name, args, inv_freq))), msg
    check_against_sources(case, ours_raw, k, v, block_of_slot, src_slots, src_offsets, dst,
                          deltas, inv_freq, msg)
    return plan, dst, msg


def per_token_layer(case, host, name, args, inv_freq):
    """A NaN-poisoned layer the per-token path (the oracle) loaded `args` (src_slots,
    src_offsets, dst, deltas) into from `host`."""
    layout, isa, dtype, H, D, rot, neox, N = CASES[case]
    raw, kv, _ = make_layer(layout, isa, DST_BLOCKS, H, N, D, dtype)
    host_k, host_v = paged_kv_views(host_as_layer(host, kv), name, H, D, N, isa)
    dst_k, dst_v = paged_kv_views(kv, name, H, D, N, isa)
    rope_shift_paged_reference(host_k, host_v, args[0] * N + args[1], dst_k, dst_v, args[2],
                               args[3], inv_freq, rot, neox)
    return raw


def check_against_sources(case, raw, k, v, block_of_slot, src_slots, src_offsets, dst,
                          deltas, inv_freq, msg):
    """The loaded tokens of `raw` against the source K/V: V and delta-0 K bit for bit
    (-0.0 kept), rotated K within RTOL of float64 RoPE."""
    layout, isa, dtype, H, D, rot, neox, N = CASES[case]
    ok = dst >= 0
    got_k, got_v = (x.reshape(DST_BLOCKS * N, H, D)[dst[ok]]
                    for x in read_kv(layout, isa, raw, H, N, D))
    blocks = block_of_slot[src_slots[ok]]
    want_k, want_v = k[blocks, src_offsets[ok]], v[blocks, src_offsets[ok]]
    assert torch.equal(bits(got_v), bits(want_v)), msg
    zero = torch.from_numpy(deltas[ok] == 0)
    assert torch.equal(bits(got_k[zero]), bits(want_k[zero])), msg
    ref, scale = rope64(want_k, torch.from_numpy(deltas[ok]), inv_freq, rot, neox)
    err = (got_k.double() - ref).abs() / scale.clamp_min(1e-30)
    assert float(err.max()) <= RTOL[dtype], f"{msg} max relative error {float(err.max()):.3g}"


def test_rotation_in_chunks_gives_the_same_bytes(rng, monkeypatch):
    np_rng, seed = rng
    case = "cpu_vec-fp32-neox"
    layout, isa, dtype, H, D, rot, neox, N = CASES[case]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _, _, _, host, name = setup_layers(case, np_rng)
    args = [torch.from_numpy(a) for a in layout_of_a_load(np_rng, N)]
    inv_freq = llama_inv_freq(rot)
    out = []
    for chunk in (shifted_slices.SLICE_CHUNK_VALUES, H * D * N):  # one row per pass
        monkeypatch.setattr(shifted_slices, "SLICE_CHUNK_VALUES", chunk)
        raw, kv, _ = make_layer(layout, isa, DST_BLOCKS, H, N, D, dtype)
        load_tokens_shifted(host, args[0], args[1], kv, name, H, D, N, args[2], args[3],
                            inv_freq, rot, neox, isa=isa)
        out.append(raw)
    assert torch.equal(bits(out[0]), bits(out[1])), f"seed={seed}"


def test_a_long_run_is_a_few_groups_not_a_step_per_token():
    """100k tokens of one module moved mid-block: two kinds of middle piece and its two
    ends; the rows are the module's blocks, and no token is left to the per-token path."""
    N, n, shift = 128, 100_000, 45
    t = np.arange(n)
    slots = np.random.default_rng(0).permutation(n // N + 1)
    dst_blocks = np.random.default_rng(1).permutation((n + shift) // N + 1)
    p = t + shift
    plan = plan_slices(slots[t // N], t % N, dst_blocks[p // N] * N + p % N,
                       np.full(n, shift), N, llama_inv_freq(64))
    assert len(plan.groups) <= 4
    assert plan.sliced_tokens == n and plan.rest.dst_slots.numel() == 0
    assert torch.equal(plan.row_slots, torch.from_numpy(slots[:len(plan.row_slots)]))
    assert plan.rotated_rows == len(plan.row_slots) == -(-n // N)


def test_runs_past_the_longest_go_per_token_and_delta_zero_rows_come_last():
    N = 16
    # A short run (per token: only the 2 longest are sliced), a delta-0 run and a
    # moved run.
    src = np.concatenate([np.arange(5), np.arange(40), np.arange(40)])
    slots = np.concatenate([np.full(5, 9), src[5:45] // N + 20, src[45:] // N + 30])
    dst = np.concatenate([np.arange(5) + 200, np.arange(40), np.arange(40) + 100])
    deltas = np.concatenate([np.full(5, 200), np.zeros(40, int), np.full(40, 100)])
    plan = plan_slices(slots, src % N, dst, deltas, N, llama_inv_freq(8), max_runs=2)
    assert plan.rest.dst_slots.tolist() == list(range(200, 205))
    # The moved run's rows come first (rotated), the delta-0 run's rows after.
    assert plan.row_slots.tolist() == [30, 31, 32, 20, 21, 22]
    assert plan.rotated_rows == 3 and plan.cos.shape == (3, 4)


def _both_paths(host_k, host_v, src_slots, src_offsets, dst, delta, inv_freq, rot, neox,
                **plan_kw):
    """(per-token reference, slices) K and V written into NaN-poisoned destinations."""
    N = host_k.shape[1]
    out = []
    for sliced in (False, True):
        k, v = torch.full_like(host_k, float("nan")), torch.full_like(host_v, float("nan"))
        if sliced:
            plan = plan_slices(src_slots, src_offsets, dst, delta, N, inv_freq, **plan_kw)
            shifted_slices.move_layer(host_k, host_v, k, v, plan, inv_freq, rot, neox)
        else:
            rope_shift_paged_reference(host_k, host_v, src_slots * N + src_offsets, k, v, dst,
                                       delta, inv_freq, rot, neox)
        out.append((k, v))
    return out


def test_a_destination_wrapping_into_its_own_block_is_no_run(monkeypatch):
    """Destination offset N-1 then offset 0 of the same block: two runs, not one piece
    running past the block's end (found by review: it raised)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    N, H, D = 4, 1, 8
    inv_freq = llama_inv_freq(D)
    host_k, host_v = torch.randn(1, N, H, D), torch.randn(1, N, H, D)
    (rk, rv), (sk, sv) = _both_paths(host_k, host_v, torch.tensor([0, 0]), torch.tensor([0, 1]),
                                     torch.tensor([3, 0]), torch.tensor([5, 5]), inv_freq, D,
                                     True)
    assert torch.equal(bits(rk), bits(sk)) and torch.equal(bits(rv), bits(sv))


@pytest.mark.parametrize("max_runs", [0, 16])
def test_delta_zero_tokens_keep_their_bits_among_many_runs(max_runs, monkeypatch):
    """More delta runs than the per-token path rotates run by run (MAX_DELTA_RUNS): its
    delta-0 tokens still keep their bits (-0.0 beside a negative partner included), as
    the slices and the Triton kernel keep them (found by review)."""
    from vllm_promptcache.kernels.rope_shift import MAX_DELTA_RUNS

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    N, H, D = 4, 1, 4
    T = MAX_DELTA_RUNS + 2
    S = T // N + 1
    inv_freq = llama_inv_freq(D)
    host_k, host_v = torch.randn(S, N, H, D), torch.randn(S, N, H, D)
    host_k[0, 0, 0] = torch.tensor([-0.0, 0.5, -1.0, 0.5])  # NeoX pair (0, 2): -0.0, -1.0
    t = torch.arange(T)
    delta = t % 2  # token 0: delta 0; T runs
    (rk, rv), (sk, sv) = _both_paths(host_k, host_v, t // N, t % N, t, delta, inv_freq, D, True,
                                     max_runs=max_runs)
    assert torch.equal(bits(rk[0, 0, 0]), bits(host_k[0, 0, 0]))  # the sign bit too
    assert torch.equal(bits(rk), bits(sk)) and torch.equal(bits(rv), bits(sv))


def _cpu_pages(blocks, H, N, D, dtype, isa, random=False):
    """A CPU-layout layer (`make_layer`'s NaN-poisoned one, or random) and its paged
    (K, V) views."""
    _, kv, _ = make_layer("cpu", isa, blocks, H, N, D, dtype)
    if random:
        kv.copy_(torch.randn(kv.shape))
    return kv, paged_kv_views(kv, "cpu", H, D, N, isa)


@pytest.mark.parametrize("delta", [0, 77])
@pytest.mark.parametrize("shift", [0, 1, 2, 15, 16, 45])
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1] == "amx"])
def test_packed_pages_move_by_token_groups_and_lanes(case, shift, delta, monkeypatch):
    """AMX-packed pages interleave 16 tokens (K) or 2 (V) with the head dims: a run
    whose destination sits `shift` tokens further into its block than its source is cut
    at the groups' edges (shift a multiple of the group) or moved lane by lane (else),
    and K is rotated as rows of whole tokens, or moved packed where no row rotates
    (delta 0): every way writes the per-token path's bytes and nothing else."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layout, isa, dtype, H, D, rot, neox, N = CASES[case]
    S, B = 4, 6
    src_kv, (host_k, host_v) = _cpu_pages(S, H, N, D, dtype, isa, random=True)
    n = 2 * N + 7
    t = torch.arange(n) + 5                     # from offset 5 of slot 0, over 3 slots
    p = t + shift
    table = torch.tensor([4, 1, 5, 0, 2])       # destination blocks, out of order
    dst = table[p // N] * N + p % N
    inv_freq = llama_inv_freq(rot)
    plan = plan_slices(t // N, t % N, dst, torch.full((n,), delta), N, inv_freq)
    assert plan.sliced_tokens == n and plan.rest.dst_slots.numel() == 0
    outs = []
    for sliced in (False, True):
        out_kv, (k, v) = _cpu_pages(B, H, N, D, dtype, isa)
        if sliced:
            shifted_slices.move_layer(host_k, host_v, k, v, plan, inv_freq, rot, neox)
        else:
            rope_shift_paged_reference(host_k, host_v, t, k, v, dst,
                                       torch.full((n,), delta), inv_freq, rot, neox)
        outs.append(out_kv)
    assert torch.equal(bits(outs[0]), bits(outs[1])), f"{case} shift={shift} delta={delta}"
    written = ~torch.isnan(outs[1].float()).all(dim=(1, 2, 3))
    assert written.tolist() == [i in (dst // N).tolist() for i in range(B)]


def test_host_and_destination_of_two_layouts_are_refused_clearly():
    """Slices need one page layout on both sides (vLLM never mixes them): a 4-D host and
    AMX-packed destination pages raise a clear error, not a shape mismatch mid-copy."""
    N, H, D = 32, 2, 16
    inv_freq = llama_inv_freq(D)
    host_k, host_v = torch.randn(2, N, H, D).bfloat16(), torch.randn(2, N, H, D).bfloat16()
    _, (dst_k, dst_v) = _cpu_pages(2, H, N, D, torch.bfloat16, "amx")
    t = torch.arange(N)
    plan = plan_slices(t * 0, t, t + 3, torch.full((N,), 3), N, inv_freq)
    with pytest.raises(ValueError, match="one layout"):
        shifted_slices.move_layer(host_k, host_v, dst_k, dst_v, plan, inv_freq, D, True)
