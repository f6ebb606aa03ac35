"""The C loop of shifted loads (kernels/cpu_native.py, cpu_shifted.c): built here, it
writes the per-token path's bytes on every layout (4-D, vLLM's CPU `vec` and AMX-packed
pages), dtype and pairing, for loads laid out as the scheduler lays them out; it plans
pieces with numpy, not a step per token; it refuses blocks outside its views; and where
it cannot be built, loads still come out right through torch, with a warning."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests.kernels.test_rope_shift import bits, llama_inv_freq
from tests.kernels.test_shifted_load import CASES, make_layer
from tests.kernels.test_shifted_slices import (
    DST_BLOCKS, _cpu_pages, check_a_planned_load, layout_of_a_load, per_token_layer,
    setup_layers)
from vllm_promptcache.kernels import cpu_native
from vllm_promptcache.kernels.cpu_native import NativePlan, move_layer_native, plan_native
from vllm_promptcache.kernels.rope_shift import rope_shift_paged_reference
from vllm_promptcache.kernels.shifted_load import (load_layers_shifted, load_tokens_shifted,
                                                   plan_cpu_load)
from vllm_promptcache.kernels.shifted_slices import SlicePlan


def test_the_c_loop_builds_and_reproduces_torch_here():
    """CI and every supported machine have a C compiler: the loop must be there, and it
    must have matched torch's rotation on its load-time check (one of the two orders of
    arithmetic)."""
    got = cpu_native.native_move()
    assert got is not None, "the C loop did not build or did not match torch (see the log)"
    assert got[1] in (0, 1)


@pytest.mark.parametrize("case", list(CASES))
def test_the_c_loop_moves_what_the_per_token_path_moves_bit_for_bit(case, rng, monkeypatch):
    plan, dst, msg = check_a_planned_load(
        case, rng, monkeypatch,
        lambda args, N, inv_freq, dtype: plan_cpu_load(*args, N, inv_freq, dtype))
    assert isinstance(plan, NativePlan), msg
    assert plan.tokens == int((dst >= 0).sum()), msg


@pytest.mark.parametrize("case", ["cpu_amx-bf16-h3-d64-rot48", "cpu_vec-fp32-neox"])
def test_every_layer_of_a_load_moves_in_one_call(case, rng, monkeypatch):
    """A load's layers laid out alike share one C call (its tables built once); a layer
    laid out otherwise (here: a pool with more blocks) gets its own; each layer still
    holds the per-token path's bytes of its own host layer."""
    np_rng, seed = rng
    layout, isa, dtype, H, D, rot, neox, N = CASES[case]
    msg = f"[{case} seed={seed}]"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    src_slots, src_offsets, dst, deltas = layout_of_a_load(np_rng, N)
    args = [torch.from_numpy(a) for a in (src_slots, src_offsets, dst, deltas)]
    inv_freq = llama_inv_freq(rot)
    hosts = [setup_layers(case, np_rng)[3] for _ in range(4)]
    layers = [make_layer(layout, isa, DST_BLOCKS + (2 if i == 2 else 0), H, N, D, dtype)
              for i in range(4)]
    plan = plan_cpu_load(*args, N, inv_freq, dtype)  # (builds and checks the loop first)
    calls = []
    real_call = cpu_native._call
    monkeypatch.setattr(cpu_native, "_call",
                        lambda fn, fused, views, *a: calls.append(len(views))
                        or real_call(fn, fused, views, *a))
    load_layers_shifted(hosts, [kv for _, kv, _ in layers], *args[:2], layers[0][2], H, D, N,
                        *args[2:], inv_freq, rot, neox, isa=isa, plan=plan)
    assert sorted(calls) == [1, 3], msg
    for i, ((raw, _, name), host) in enumerate(zip(layers, hosts)):
        want = per_token_layer(case, host, name, args, inv_freq)
        assert torch.equal(bits(raw[:DST_BLOCKS]), bits(want)), f"{msg} layer {i}"
        if i == 2:  # nothing written past the other layers' pool
            assert torch.isnan(raw[DST_BLOCKS:].float()).all(), msg


# NeoX on AMX pages, where pairs of pairs rotate as runs of words: with a tail of
# unrotated dims (rotary 40 of 64), and with an odd half (34: element by element).
SHIFT_CASES = {**{c: CASES[c] for c in ("cpu_amx-bf16-h3-d64-rot48", "cpu_vec-fp32-neox",
                                        "cpu_amx-bf16-b128-tiny")},
               "cpu_amx-bf16-d64-rot40-neox": ("cpu", "amx", torch.bfloat16, 2, 64, 40, True, 32),
               "cpu_amx-fp16-d64-rot34-neox": ("cpu", "amx", torch.float16, 2, 64, 34, True, 32)}


@pytest.mark.parametrize("delta", [0, 77])
@pytest.mark.parametrize("shift", [0, 1, 2, 15, 16, 45])
@pytest.mark.parametrize("case", list(SHIFT_CASES))
def test_every_shift_against_packed_groups(case, shift, delta):
    """A run moved `shift` tokens further into its blocks than its source (AMX: inside or
    across the 16-token K groups and the V pairs; group-aligned runs of K rotate as
    words, V moves as runs of words where both sides' pairs line up and by joining
    word halves where they are off by one token, odd ends by elements): the per-token
    path's bytes and nothing else."""
    _, isa, dtype, H, D, rot, neox, N = SHIFT_CASES[case]
    S, B = 4, 6
    _, (host_k, host_v) = _cpu_pages(S, H, N, D, dtype, isa, random=True)
    n = 2 * N + 7
    t = torch.arange(n) + 5
    p = t + shift
    table = torch.tensor([4, 1, 5, 0, 2])
    dst = table[p // N] * N + p % N
    inv_freq = llama_inv_freq(rot)
    deltas = torch.full((n,), delta)
    outs = []
    for native in (False, True):
        out_kv, (k, v) = _cpu_pages(B, H, N, D, dtype, isa)
        if native:
            move_layer_native(host_k, host_v, k, v, plan_native(t // N, t % N, dst, deltas, N,
                                                                inv_freq), rot, neox)
        else:
            rope_shift_paged_reference(host_k, host_v, t, k, v, dst, deltas, inv_freq, rot, neox)
        outs.append(out_kv)
    assert torch.equal(bits(outs[0]), bits(outs[1])), f"{case} shift={shift} delta={delta}"


def test_a_plan_is_pieces_built_without_a_step_per_token():
    """100k tokens of one module moved mid-block, behind a 5-token label: pieces cut only
    at block edges and where the delta changes (the label is one piece), a few numpy
    calls whatever the length (the plan's arrays are per piece, not per token)."""
    N, T = 128, 100_000
    t = np.arange(T)
    src_slots, src_offsets = t // N, t % N
    dst = np.concatenate([np.arange(5) + 40, t + 45])
    deltas = np.concatenate([np.zeros(5, np.int64), np.full(T, 45)])
    src_slots = np.concatenate([np.full(5, 900), src_slots])
    src_offsets = np.concatenate([np.arange(5) + 40, src_offsets])
    plan = plan_native(src_slots, src_offsets, dst, deltas, N, llama_inv_freq(64))
    # Each source block's tokens straddle two destination blocks (45 tokens in).
    assert plan.pieces == 1 + 2 * (-(-T // N)) - 1
    assert plan.tokens == T + 5
    assert plan.length[0] == 5 and plan.run[0] == -1 and (plan.run[1:] == 0).all()
    assert plan.cos.shape == (1, 32)


def test_blocks_outside_the_views_are_refused():
    H, D, N = 2, 32, 16
    _, (host_k, host_v) = _cpu_pages(2, H, N, D, torch.bfloat16, "vec", random=True)
    _, (k, v) = _cpu_pages(3, H, N, D, torch.bfloat16, "vec")
    inv_freq = llama_inv_freq(D)
    far_source = plan_native([2], [0], [0], [5], N, inv_freq)
    with pytest.raises(IndexError, match="source block 2 of 2"):
        move_layer_native(host_k, host_v, k, v, far_source, D, True)
    far_dest = plan_native([1], [0], [3 * N], [5], N, inv_freq)
    with pytest.raises(IndexError, match="destination 3 of 3"):
        move_layer_native(host_k, host_v, k, v, far_dest, D, True)
    with pytest.raises(ValueError, match="one dtype"):
        move_layer_native(host_k, host_v, k.float(), v.float(),
                          plan_native([1], [0], [0], [5], N, inv_freq), D, True)


def test_without_a_compiler_loads_stay_right_through_torch(tmp_path):
    """CC names no compiler and nothing is built yet: one warning says why, the plan is
    torch's slices, and a load still writes the per-token path's bytes."""
    script = textwrap.dedent("""
        import logging, torch
        logging.basicConfig(level=logging.WARNING)
        from tests.kernels.test_rope_shift import bits, llama_inv_freq
        from tests.kernels.test_shifted_slices import _cpu_pages
        from vllm_promptcache.kernels.cpu_native import native_move
        from vllm_promptcache.kernels.rope_shift import rope_shift_paged_reference
        from vllm_promptcache.kernels.shifted_load import plan_cpu_load
        from vllm_promptcache.kernels.shifted_slices import SlicePlan, move_layer
        assert native_move() is None
        H, D, N = 2, 32, 16
        _, (hk, hv) = _cpu_pages(3, H, N, D, torch.bfloat16, "vec", random=True)
        t = torch.arange(40)
        dst, deltas, inv_freq = t + 7, torch.full((40,), 9), llama_inv_freq(D)
        plan = plan_cpu_load(t // N, t % N, dst, deltas, N, inv_freq, torch.bfloat16)
        assert isinstance(plan, SlicePlan)
        outs = []
        for ours in (True, False):
            kv, (k, v) = _cpu_pages(4, H, N, D, torch.bfloat16, "vec")
            if ours:
                move_layer(hk, hv, k, v, plan, inv_freq, D, True)
            else:
                rope_shift_paged_reference(hk, hv, t, k, v, dst, deltas, inv_freq, D, True)
            outs.append(kv)
        assert torch.equal(bits(outs[0]), bits(outs[1]))
        print("OK")
    """)
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"),
               PROMPTCACHE_NATIVE_DIR=str(tmp_path / "native"), TMPDIR=str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    assert "shifted loads stay on the torch paths" in proc.stderr
    assert "no-such-cc" in proc.stderr


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("PROMPTCACHE_NATIVE", "0")
    monkeypatch.setattr(cpu_native, "_state", {})
    assert cpu_native.native_move() is None
    plan = plan_cpu_load([0], [0], [3], [1], 16, llama_inv_freq(32), torch.bfloat16)
    assert isinstance(plan, SlicePlan)
