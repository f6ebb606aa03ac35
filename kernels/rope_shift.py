"""Copy K/V of a run of tokens into vLLM's paged KV cache, rotating K by a RoPE delta.

KV computed for tokens at positions p can be reused at positions p + delta: RoPE is a
rotation, RoPE(x, p + d) = R(d) RoPE(x, p), so K only needs rotating by the delta's
angles and V is position-free.  `rope_shift_` writes

    dst_k[slot] <- R(delta) src_k        dst_v[slot] <- src_v

for every token whose slot is not -1.  V, the non-rotary tail of K (dims >= rotary_dim)
and K of tokens with delta == 0 are copied bit-for-bit (no arithmetic); the rotation is
computed in float32 from float64 angles reduced into [-pi, pi] (delta * inv_freq is exact
in float64 for |delta| < 2**29), so large deltas lose no accuracy.

The frequencies are not derived here: pass the model's own `inv_freq` (e.g. what
`RotaryEmbedding._compute_inv_freq(base)` of the layer's vLLM rotary embedding returns,
which includes Llama-3 / linear scaling).

Destinations
------------
`dst_k` / `dst_v` are views of one layer of the paged cache, either

* 4-D ``[num_blocks, block_size, num_kv_heads, head_size]`` with any strides, or
* 6-D "packed" ``[num_blocks, block_size // TG, TG, num_kv_heads, head_size // DG, DG]``
  with any strides, for caches whose token and head-dim axes are interleaved in groups
  (vLLM's CPU AMX layout) and so have no 4-D strided view.

`paged_kv_views` builds them from a layer's KV tensor; see its docstring for the layouts.

Layout findings (vLLM 0.32, read from site-packages and checked against the installed
``torch.ops._C.cpu_attn_reshape_and_cache`` in tests/kernels/test_rope_shift.py):

* Every backend's layer tensor is the logical ``[B, H, N, C]`` page of
  ``vllm/v1/kv_cache_interface.py`` (``compute_layer_kv_cache_shape_bytes``: blocks,
  ``num_heads`` (= num_kv_heads), ``num_states`` (= block_size tokens),
  ``state_content_size_bytes`` = (head_size + head_size_v) * dtype size), viewed as the
  KV dtype; the physical order is the group's ``KVCacheLayout`` (``vllm/v1/kv_cache_layout.py``).
* FlashAttention (``v1/attention/backends/flash_attn.py``, ``forward``):
  ``key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)``,
  i.e. per token K is content[:head_size], V is content[head_size:].  Older vLLM used
  ``(2, num_blocks, block_size, num_kv_heads, head_size)``; both are accepted.
* CPU (``v1/attention/backends/cpu_attn.py``): ``supported_kv_cache_layouts`` is only
  ``KVCacheLayout.LBHNC``, so each (block, head) page of ``block_size * 2 * head_size``
  elements is contiguous, and ``forward``/``do_kv_cache_update`` do
  ``kv_cache.view((num_blocks, num_kv_heads, block_size * 2, -1)).chunk(2, dim=2)``:
  the first half of the page is K, the second half V -- *not* K|V per token as the
  shape ``(num_blocks, num_kv_heads, block_size, 2 * head_size)`` suggests.  Inside each
  half the C++ ``reshape_and_cache`` of the layer's ISA (``_get_attn_isa``, stored on
  the layer as ``layer.isa``) packs the data:

  - ``vec`` / ``vec16`` (x86 without AMX tiles or not bf16; vec16 also for head sizes
    that are a multiple of 16 but not 32): K transposed ``[head_size, block_size]``,
    V ``[block_size, head_size]`` (found by probing the installed op).
  - ``amx`` (bf16 and block_size % 32 == 0 on CPUs with AMX tiles; csrc/cpu/
    cpu_attn_amx.hpp ``reshape_and_cache``, and the installed op): K element (o, d)
    at ``(o//16)*16*D + (d//2)*32 + (o%16)*2 + d%2``; V element (o, d) at
    ``(o//2)*32 + o%2 + (d//16)*16*N + (d%16)*2`` (N = block_size, D = head_size).

  The observed ``(num_blocks, 2, 128, 64)`` bf16 tensor with strides
  ``(16384, 8192, 64, 1)`` is therefore 2 KV heads, block 128, head 32, and on an AMX
  machine its K/V are AMX-packed.
"""

from __future__ import annotations

import math
import threading

import torch

from .triton_launch import HAS_TRITON, interpreting, launchable

if HAS_TRITON:
    import triton
    import triton.language as tl

# Launch parameters (one program per token; it loops over the heads BLOCK_H at a time).
MAX_BLOCK_H = 8
NUM_WARPS = 4

# 2*pi split for Cody-Waite reduction: TWO_PI_HI is float32-exact, so turns * TWO_PI_HI
# is exact in float64 for |turns| < 2**29.
TWO_PI_HI = float(torch.tensor(2 * math.pi, dtype=torch.float32).item())
TWO_PI_LO = 2 * math.pi - TWO_PI_HI
INV_TWO_PI = 1.0 / (2 * math.pi)

# vLLM CPU AMX packing (csrc/cpu/cpu_attn_amx.hpp): 64-byte tile rows, 4-byte words.
AMX_TILE_ROW_BYTES = 64
AMX_WORD_BYTES = 4

PAGED_LAYOUTS = ("flash_attn", "cpu")
CPU_ISAS = ("vec", "vec16", "amx")


# --------------------------------------------------------------------------- views

def _as_paged6(dst: torch.Tensor) -> torch.Tensor:
    """[B, N, H, D] (any strides) -> [B, 1, N, H, 1, D]; 6-D views pass through."""
    if dst.dim() == 6:
        return dst
    if dst.dim() != 4:
        raise ValueError(f"paged destination must be 4-D or 6-D, got shape {tuple(dst.shape)}")
    return dst.unsqueeze(1).unsqueeze(4)


def _cpu_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size)


def paged_kv_views(kv_cache: torch.Tensor, layout: str, num_kv_heads: int, head_size: int,
                   block_size: int, isa: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dst_k, dst_v) views of one layer's KV tensor, for `rope_shift_`.

    layout "flash_attn": vLLM 0.32's ``[num_blocks, num_kv_heads, block_size, 2*head_size]``
        (any physical permutation), K = content[:head_size]; or the older 5-D
        ``(2, num_blocks, block_size, num_kv_heads, head_size)``.  Returns 4-D views.
    layout "cpu": the CPU backend's ``[num_blocks, num_kv_heads, block_size, 2*head_size]``
        (LBHNC, page-contiguous), K = first half of each (block, head) page, V = second
        half, packed per `isa` (the layer's ``layer.isa``; by default what vLLM's
        ``_get_attn_isa(kv_cache.dtype, block_size, head_size)`` picks on this machine --
        pass it explicitly when the model dtype differs from the cache's).  "vec"/"vec16"
        give 4-D views, "amx" 6-D packed views.  See the module docstring.
    """
    H, D, N = num_kv_heads, head_size, block_size
    if layout == "flash_attn":
        if kv_cache.dim() == 5:
            if kv_cache.shape[0] != 2 or tuple(kv_cache.shape[2:]) != (N, H, D):
                raise ValueError(f"expected (2, blocks, {N}, {H}, {D}), "
                                 f"got {tuple(kv_cache.shape)}")
            return kv_cache[0], kv_cache[1]
        if kv_cache.dim() != 4 or tuple(kv_cache.shape[1:]) != (H, N, 2 * D):
            raise ValueError(f"expected (blocks, {H}, {N}, {2 * D}), got {tuple(kv_cache.shape)}")
        k, v = kv_cache.transpose(1, 2).split(D, dim=-1)
        return k, v
    if layout != "cpu":
        raise ValueError(f"unknown paged layout {layout!r}; expected one of {PAGED_LAYOUTS}")

    if kv_cache.dim() != 4 or tuple(kv_cache.shape[1:]) != (H, N, 2 * D):
        raise ValueError(f"expected (blocks, {H}, {N}, {2 * D}), got {tuple(kv_cache.shape)}")
    if kv_cache.stride(3) != 1 or kv_cache.stride(2) != 2 * D:
        raise ValueError("CPU KV pages must be contiguous per (block, head) (layout LBHNC), "
                         f"got strides {kv_cache.stride()}")
    isa = isa or _cpu_isa(kv_cache.dtype, N, D)
    B = kv_cache.shape[0]
    sb, sh = kv_cache.stride(0), kv_cache.stride(1)
    base = kv_cache.storage_offset()
    v_base = base + N * D  # V is the second half of each (block, head) page
    if isa in ("vec", "vec16"):
        # K page is [D, N] (transposed), V page is [N, D].
        k = kv_cache.as_strided((B, N, H, D), (sb, 1, sh, N), base)
        v = kv_cache.as_strided((B, N, H, D), (sb, D, sh, 1), v_base)
        return k, v
    if isa == "amx":
        elem = kv_cache.element_size()
        if AMX_WORD_BYTES % elem or elem == AMX_WORD_BYTES:
            raise ValueError(f"AMX KV packing is for 16-bit caches, got {kv_cache.dtype}")
        per_word = AMX_WORD_BYTES // elem                     # head dims (K) / tokens (V) per word
        k_tokens = AMX_TILE_ROW_BYTES // AMX_WORD_BYTES       # tokens per K group (16)
        v_dims = AMX_TILE_ROW_BYTES // AMX_WORD_BYTES         # head dims per V group (16)
        if N % k_tokens or D % per_word or D % v_dims:
            raise ValueError(f"AMX packing needs block_size % {k_tokens} == 0 and "
                             f"head_size % {v_dims} == 0, got {N}, {D}")
        k = kv_cache.as_strided(
            (B, N // k_tokens, k_tokens, H, D // per_word, per_word),
            (sb, k_tokens * D, per_word, sh, k_tokens * per_word, 1), base)
        v = kv_cache.as_strided(
            (B, N // per_word, per_word, H, D // v_dims, v_dims),
            (sb, per_word * v_dims, 1, sh, N * v_dims, per_word), v_base)
        return k, v
    raise NotImplementedError(f"CPU attention ISA {isa!r} packs KV in a layout not handled "
                              f"here (handled: {CPU_ISAS})")


# ------------------------------------------------------------------------ checking

def _check(src_k, src_v, dst_k, dst_v, slot_mapping, delta, inv_freq, rotary_dim):
    if src_k.dim() != 3 or src_v.shape != src_k.shape:
        raise ValueError(f"src_k/src_v must be [tokens, heads, head_size], got "
                         f"{tuple(src_k.shape)} / {tuple(src_v.shape)}")
    T, H, D = src_k.shape
    if len({src_k.dtype, src_v.dtype, dst_k.dtype, dst_v.dtype}) != 1:
        raise ValueError("src_k, src_v, dst_k and dst_v must share one dtype (copies are "
                         f"bit-exact), got {src_k.dtype}, {src_v.dtype}, {dst_k.dtype}, "
                         f"{dst_v.dtype}")
    if src_k.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {src_k.dtype}")
    k6, v6 = _as_paged6(dst_k), _as_paged6(dst_v)
    for name, d6 in (("dst_k", k6), ("dst_v", v6)):
        if d6.shape[3] != H or d6.shape[4] * d6.shape[5] != D:
            raise ValueError(f"{name} of shape {tuple(d6.shape)} does not hold {H} heads of {D}")
    if k6.shape[0] != v6.shape[0] or k6.shape[1] * k6.shape[2] != v6.shape[1] * v6.shape[2]:
        raise ValueError("dst_k and dst_v disagree on blocks / block size")
    if slot_mapping.shape != (T,) or delta.shape != (T,):
        raise ValueError(f"slot_mapping and delta must be [{T}]")
    if rotary_dim % 2 or not 0 <= rotary_dim <= D:
        raise ValueError(f"rotary_dim must be even and <= head_size, got {rotary_dim}")
    if inv_freq.numel() != rotary_dim // 2:
        raise ValueError(f"inv_freq has {inv_freq.numel()} entries, rotary_dim // 2 = "
                         f"{rotary_dim // 2}")
    return k6, v6


# ----------------------------------------------------------------------- reference

# Above this many runs of equal delta, angles are gathered per token instead.
MAX_DELTA_RUNS = 64


def _rotated(k: torch.Tensor, d: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
             is_neox_style: bool, in_place: bool = False) -> torch.Tensor:
    """k [T, H, D] with token t rotated by d[t] positions: a new tensor, or k itself
    when `in_place` (the paged path's gathered tokens are its own copy).

    Deltas come in runs (a moved module, a kept turn: one delta each), so the work is
    done per run on slices: the angles once per run, in float64 as the oracle wants,
    then one multiply and one fused multiply-add per chunk.  Runs of delta 0 are left
    as they are.  Many short runs fall back to per-token angles."""
    T = k.shape[0]
    edges = (torch.nonzero(d[1:] != d[:-1]).flatten() + 1).tolist()
    out = k if in_place else torch.empty_like(k)
    if len(edges) + 1 > MAX_DELTA_RUNS:
        # Every token rotated, delta-0 ones by angle 0, which would not keep their bits
        # (-0.0 * 1 + x * -0.0 is +0.0 for a negative x): they are put back as they were.
        zero = torch.nonzero(d == 0).flatten()
        unmoved = k[zero]  # (a copy)
        ang = d.to(torch.float64)[:, None] * inv_freq.to(torch.float64).flatten()[None, :]
        _rotate_into(out, k, ang.cos().to(torch.float32)[:, None, :],
                     ang.sin().to(torch.float32)[:, None, :], rotary_dim, is_neox_style)
        out[zero] = unmoved
        return out
    inv = inv_freq.to(torch.float64).flatten()
    for a, b in zip([0] + edges, edges + [T]):
        delta = int(d[a])
        if delta == 0:
            if not in_place:
                out[a:b] = k[a:b]
            continue
        ang = delta * inv
        _rotate_into(out[a:b], k[a:b], ang.cos().to(torch.float32).view(1, 1, -1),
                     ang.sin().to(torch.float32).view(1, 1, -1), rotary_dim, is_neox_style)
    return out


# Float32 values rotated per pass (1 MiB): the chunk's two float32 buffers are kept
# between calls (see `_scratch`), so a pass neither allocates nor page-faults, and a
# chunk is large enough that the per-op overhead of a few torch calls stays small.
ROTATE_CHUNK_VALUES = 1 << 18

_scratch_local = threading.local()


def _scratch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 buffers of n values, this thread's own, reused across calls."""
    bufs = getattr(_scratch_local, "bufs", None)
    if bufs is None or bufs[0].numel() < n:
        bufs = _scratch_local.bufs = (torch.empty(n), torch.empty(n))
    return bufs[0][:n], bufs[1][:n]


def _pair_halves(x: torch.Tensor, dim: int, half: int, is_neox_style: bool):
    """(first, second) of each rotary pair along axis `dim` of x's rotary part: the two
    halves (NeoX) or the even and odd dims (GPT-J), as views."""
    if is_neox_style:
        return x.narrow(dim, 0, half), x.narrow(dim, half, half)
    pairs = x.unflatten(dim, (half, 2))
    return pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)


def rotate_pairs_(out: torch.Tensor, x: torch.Tensor, dim: int, cos: torch.Tensor,
                  sin: torch.Tensor, neg_sin: torch.Tensor, rotary_dim: int,
                  is_neox_style: bool) -> None:
    """out's head dims (axis `dim`) [0, rotary_dim) <- x's, rotated: per pair (x1, x2),
    x1 * cos - x2 * sin and x2 * cos + x1 * sin, in float32 (a multiply, then
    `addcmul_`, fused where the CPU build vectorizes it), rounded into x's dtype at the
    end: the CPU paths' one arithmetic, the same operations in the same order whichever
    layout and chunking.  cos, sin and neg_sin (float32) broadcast against a pair half, the
    half-dims at `dim`.  `out` may be `x`: x's rotary part is first read into this
    thread's float32 scratch."""
    half = rotary_dim // 2
    src, dst = x.narrow(dim, 0, rotary_dim), out.narrow(dim, 0, rotary_dim)
    x32_buf, y32_buf = _scratch(src.numel())
    x32 = x32_buf.view(src.shape)
    x32.copy_(src)
    a, b = _pair_halves(x32, dim, half, is_neox_style)
    out_a, out_b = _pair_halves(dst, dim, half, is_neox_style)
    y = y32_buf[:a.numel()].view(a.shape)
    out_a.copy_(torch.mul(a, cos, out=y).addcmul_(b, neg_sin))
    out_b.copy_(torch.mul(b, cos, out=y).addcmul_(a, sin))


def _rotate_into(out: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 rotary_dim: int, is_neox_style: bool) -> None:
    """out[..., :rotary_dim] <- k [T, H, D] rotated (`rotate_pairs_`, in chunks of
    tokens); the other dims copied.  cos/sin: [T or 1, 1, rotary_dim // 2]."""
    per_token = cos.shape[0] > 1
    neg_sin = -sin
    T, H = k.shape[0], k.shape[1]
    step = max(1, ROTATE_CHUNK_VALUES // (H * rotary_dim))
    for a in range(0, T, step):
        b = min(a + step, T)
        c, s, ns = (t[a:b] if per_token else t for t in (cos, sin, neg_sin))
        rotate_pairs_(out[a:b], k[a:b], 2, c, s, ns, rotary_dim, is_neox_style)
    if rotary_dim < k.shape[-1] and out.data_ptr() != k.data_ptr():
        out[..., rotary_dim:] = k[..., rotary_dim:]


def rope_shift_reference(src_k: torch.Tensor, src_v: torch.Tensor, dst_k: torch.Tensor,
                         dst_v: torch.Tensor, slot_mapping: torch.Tensor, delta: torch.Tensor,
                         inv_freq: torch.Tensor, rotary_dim: int, is_neox_style: bool,
                         sources_are_scratch: bool = False) -> None:
    """Plain-torch `rope_shift_`: the CPU path and the test oracle (same semantics).
    `sources_are_scratch`: src_k is the caller's own copy, rotated in place."""
    k6, v6 = _check(src_k, src_v, dst_k, dst_v, slot_mapping, delta, inv_freq, rotary_dim)
    T, H, D = src_k.shape
    in_place = sources_are_scratch
    if bool((slot_mapping >= 0).all()):  # the common case: no gather
        slots, d, k, v = slot_mapping.to(torch.int64), delta.to(torch.int64), src_k, src_v
    else:
        in_place = True  # k is the gather's copy
        keep = (slot_mapping >= 0).nonzero().flatten()
        if keep.numel() == 0:
            return
        slots = slot_mapping[keep].to(torch.int64)
        d = delta[keep].to(torch.int64)
        k = src_k[keep]
        v = src_v[keep]

    # Only tokens that move are rotated; the rest (and all of V) are copied as is.
    if rotary_dim > 0 and bool((d != 0).any()):
        k = _rotated(k, d, inv_freq, rotary_dim, is_neox_style, in_place=in_place)

    block_size = k6.shape[1] * k6.shape[2]
    blk, off = slots // block_size, slots % block_size
    for dst, d6, x in ((dst_k, k6, k), (dst_v, v6, v)):
        if dst.dim() == 4:  # two indices, as a plain indexed copy
            dst[blk, off] = x
            continue
        tg = d6.shape[2]
        d6[blk, off // tg, off % tg] = x.reshape(x.shape[0], H, d6.shape[4], d6.shape[5])


# -------------------------------------------------------------------------- triton

if HAS_TRITON:

    @triton.jit
    def _f32_to_bf16_rtne(x):
        # float32 -> bfloat16, round to nearest even, spelled out: the GPU's cast does
        # this too, but the interpreter's cast truncates.  (No NaNs reach it.)
        u = x.to(tl.uint32, bitcast=True)
        u = u + (0x7FFF + ((u >> 16) & 1))
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _rope_shift_kernel(
        src_k_ptr, src_v_ptr, dst_k_ptr, dst_v_ptr, src_slot_ptr, slot_ptr, delta_ptr,
        inv_freq_ptr, num_heads, head_size, rotary_dim, block_size, src_block_size,
        # sources in the destinations' 6-D form (a [T, H, D] source: one token per "block")
        sk_b, sk_g, sk_t, sk_h, sk_dg, sk_d, sk_tg, sk_dgs,
        sv_b, sv_g, sv_t, sv_h, sv_dg, sv_d, sv_tg, sv_dgs,
        # destinations as [block, token group, token in group, head, dim group, dim in group]
        dk_b, dk_g, dk_t, dk_h, dk_dg, dk_d, k_tg, k_dg,
        dv_b, dv_g, dv_t, dv_h, dv_dg, dv_d, v_tg, v_dg,
        SRC_PAGED: tl.constexpr, IS_NEOX: tl.constexpr, IS_BF16: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        TWO_PI_HI: tl.constexpr, TWO_PI_LO: tl.constexpr, INV_TWO_PI: tl.constexpr,
    ):
        tok = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        if slot >= 0:
            delta = tl.load(delta_ptr + tok).to(tl.int64)
            blk = slot // block_size
            off = slot % block_size

            d = tl.arange(0, BLOCK_D)
            d_mask = d < head_size
            is_rot = d < rotary_dim
            if IS_NEOX:
                half = rotary_dim // 2
                lo = d < half
                fidx = tl.where(lo, d, d - half)
                partner = tl.where(lo, d + half, d - half)
                sign = tl.where(lo, -1.0, 1.0)
            else:
                odd = d % 2
                fidx = d // 2
                partner = d + 1 - 2 * odd
                sign = tl.where(odd == 0, -1.0, 1.0)
            partner = tl.where(is_rot, partner, d)
            freq = tl.load(inv_freq_ptr + fidx, mask=is_rot & d_mask, other=0.0)
            # Exact float64 angle, reduced to [-pi, pi] before the float32 sin/cos.
            ang = delta.to(tl.float64) * freq.to(tl.float64)
            # (Float constants may be materialised as float32: HI is float32-exact and LO's
            # rounding costs ~1e-14 rad per turn.)
            turns = tl.floor(ang * INV_TWO_PI + 0.5)
            red = (ang - turns * TWO_PI_HI) - turns * TWO_PI_LO
            red = red.to(tl.float32)
            cos = tl.cos(red)
            sin = tl.sin(red) * sign
            keep_k = (~is_rot)[None, :] | (delta == 0)

            if SRC_PAGED:
                src = tl.load(src_slot_ptr + tok).to(tl.int64)
            else:
                src = tok
            s_blk = src // src_block_size
            s_off = src % src_block_size
            sk_tok = s_blk * sk_b + (s_off // sk_tg) * sk_g + (s_off % sk_tg) * sk_t
            sk_dim = (d // sk_dgs) * sk_dg + (d % sk_dgs) * sk_d
            sk_par = (partner // sk_dgs) * sk_dg + (partner % sk_dgs) * sk_d
            sv_tok = s_blk * sv_b + (s_off // sv_tg) * sv_g + (s_off % sv_tg) * sv_t
            sv_dim = (d // sv_dgs) * sv_dg + (d % sv_dgs) * sv_d

            k_tok = blk * dk_b + (off // k_tg) * dk_g + (off % k_tg) * dk_t
            k_dim = (d // k_dg) * dk_dg + (d % k_dg) * dk_d
            v_tok = blk * dv_b + (off // v_tg) * dv_g + (off % v_tg) * dv_t
            v_dim = (d // v_dg) * dv_dg + (d % v_dg) * dv_d

            for h0 in range(0, num_heads, BLOCK_H):
                h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
                mask = (h < num_heads)[:, None] & d_mask[None, :]
                src_k_row = src_k_ptr + sk_tok + h[:, None] * sk_h
                k = tl.load(src_k_row + sk_dim[None, :], mask=mask)
                kp = tl.load(src_k_row + sk_par[None, :], mask=mask)
                rot = k.to(tl.float32) * cos[None, :] + kp.to(tl.float32) * sin[None, :]
                if IS_BF16:
                    rot = _f32_to_bf16_rtne(rot)
                else:
                    rot = rot.to(k.dtype)
                out = tl.where(keep_k, k, rot)
                tl.store(dst_k_ptr + k_tok + h[:, None] * dk_h + k_dim[None, :], out, mask=mask)
                v = tl.load(src_v_ptr + sv_tok + h[:, None] * sv_h + sv_dim[None, :], mask=mask)
                tl.store(dst_v_ptr + v_tok + h[:, None] * dv_h + v_dim[None, :], v, mask=mask)


def _grid(num_tokens: int) -> tuple[int]:
    return (num_tokens,)


def _launch(src_k6: torch.Tensor, src_v6: torch.Tensor, src_slots: torch.Tensor | None,
            k6: torch.Tensor, v6: torch.Tensor, slot_mapping: torch.Tensor,
            delta: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
            is_neox_style: bool) -> None:
    """One program per token; sources and destinations as 6-D paged views."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    T = slot_mapping.numel()
    if T == 0:
        return
    H, D = k6.shape[3], k6.shape[4] * k6.shape[5]
    device = k6.device
    inv_freq = inv_freq.to(device=device, dtype=torch.float32).contiguous()
    if inv_freq.numel() == 0:
        inv_freq = torch.zeros(1, dtype=torch.float32, device=device)
    slot_mapping = slot_mapping.to(torch.int64).contiguous()
    delta = delta.to(device=device, dtype=torch.int64).contiguous()
    src_paged = src_slots is not None
    src_slots = src_slots.to(torch.int64).contiguous() if src_paged else slot_mapping
    launchable(_rope_shift_kernel, {"_f32_to_bf16_rtne": _f32_to_bf16_rtne})[_grid(T)](
        src_k6, src_v6, k6, v6, src_slots, slot_mapping, delta, inv_freq,
        H, D, rotary_dim, k6.shape[1] * k6.shape[2], src_k6.shape[1] * src_k6.shape[2],
        *src_k6.stride(), src_k6.shape[2], src_k6.shape[5],
        *src_v6.stride(), src_v6.shape[2], src_v6.shape[5],
        *k6.stride(), k6.shape[2], k6.shape[5],
        *v6.stride(), v6.shape[2], v6.shape[5],
        SRC_PAGED=src_paged, IS_NEOX=bool(is_neox_style), IS_BF16=k6.dtype == torch.bfloat16,
        BLOCK_H=min(triton.next_power_of_2(H), MAX_BLOCK_H),
        BLOCK_D=triton.next_power_of_2(D),
        TWO_PI_HI=TWO_PI_HI, TWO_PI_LO=TWO_PI_LO, INV_TWO_PI=INV_TWO_PI,
        num_warps=NUM_WARPS,
    )


def _tokens_as_paged6(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] -> [T, 1, 1, H, 1, D]: each token its own one-token block."""
    return x.unsqueeze(1).unsqueeze(1).unsqueeze(4)


def rope_shift_triton(src_k: torch.Tensor, src_v: torch.Tensor, dst_k: torch.Tensor,
                      dst_v: torch.Tensor, slot_mapping: torch.Tensor, delta: torch.Tensor,
                      inv_freq: torch.Tensor, rotary_dim: int, is_neox_style: bool) -> None:
    """Launch the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    k6, v6 = _check(src_k, src_v, dst_k, dst_v, slot_mapping, delta, inv_freq, rotary_dim)
    _launch(_tokens_as_paged6(src_k), _tokens_as_paged6(src_v), None, k6, v6, slot_mapping,
            delta, inv_freq, rotary_dim, is_neox_style)


def _use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or interpreting())


def rope_shift_(src_k: torch.Tensor, src_v: torch.Tensor, dst_k: torch.Tensor,
                dst_v: torch.Tensor, slot_mapping: torch.Tensor, delta: torch.Tensor,
                inv_freq: torch.Tensor, rotary_dim: int, is_neox_style: bool) -> None:
    """dst_k[slot] <- RoPE-rotate(src_k, delta), dst_v[slot] <- src_v, skipping slot -1.

    src_k, src_v: [num_tokens, num_kv_heads, head_size] (fp32 / bf16 / fp16).
    dst_k, dst_v: views of the paged cache (see `paged_kv_views`), written in place; the
        same dtype as the sources (copies are bit-exact, nothing is converted).
    slot_mapping: [num_tokens] int64, slot = block_id * block_size + offset, -1 = skip.
    delta: [num_tokens] int64 position deltas (any sign, |delta| < 2**29).
    inv_freq: [rotary_dim // 2] float32, the model's rotary frequencies.
    rotary_dim: dims [0, rotary_dim) rotate, the rest are copied.
    is_neox_style: NeoX halves (vLLM's default) or GPT-J interleaved pairs.

    Slots are not range-checked by the Triton path (out-of-range slots write out of
    bounds); the reference raises on them.
    """
    if _use_triton(src_k):
        rope_shift_triton(src_k, src_v, dst_k, dst_v, slot_mapping, delta, inv_freq,
                          rotary_dim, is_neox_style)
    else:
        rope_shift_reference(src_k, src_v, dst_k, dst_v, slot_mapping, delta, inv_freq,
                             rotary_dim, is_neox_style)


# ------------------------------------------------------------ paged sources (host slots)

def gather_tokens(view: torch.Tensor, src_slot_mapping: torch.Tensor) -> torch.Tensor:
    """view[slot // block_size, slot % block_size] as [T, heads, head_size], from a 4-D or
    6-D paged view (a copy)."""
    v6 = _as_paged6(view)
    tg = v6.shape[2]
    block_size = v6.shape[1] * tg
    s = src_slot_mapping.to(device=view.device, dtype=torch.int64)
    blk, off = s // block_size, s % block_size
    out = v6[blk, off // tg, off % tg]
    return out.reshape(out.shape[0], out.shape[1], -1)


def rope_shift_paged_reference(src_k: torch.Tensor, src_v: torch.Tensor,
                               src_slot_mapping: torch.Tensor, dst_k: torch.Tensor,
                               dst_v: torch.Tensor, slot_mapping: torch.Tensor,
                               delta: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
                               is_neox_style: bool) -> None:
    """Plain-torch `rope_shift_paged_`: gather the tokens, then `rope_shift_reference`."""
    device = dst_k.device
    rope_shift_reference(gather_tokens(src_k, src_slot_mapping).to(device),
                         gather_tokens(src_v, src_slot_mapping).to(device), dst_k, dst_v,
                         slot_mapping.to(device), delta.to(device), inv_freq, rotary_dim,
                         is_neox_style, sources_are_scratch=True)


def rope_shift_paged_triton(src_k: torch.Tensor, src_v: torch.Tensor,
                            src_slot_mapping: torch.Tensor, dst_k: torch.Tensor,
                            dst_v: torch.Tensor, slot_mapping: torch.Tensor,
                            delta: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
                            is_neox_style: bool) -> None:
    """`rope_shift_paged_`'s kernel: each program reads its token straight from the source
    view (on CUDA: a device view of pinned host memory), no gather."""
    T = slot_mapping.numel()
    sk6, sv6 = _as_paged6(src_k), _as_paged6(src_v)
    probe = torch.empty((T, sk6.shape[3], sk6.shape[4] * sk6.shape[5]), dtype=src_k.dtype,
                        device="meta")
    k6, v6 = _check(probe, probe, dst_k, dst_v, slot_mapping, delta, inv_freq, rotary_dim)
    if src_slot_mapping.shape != (T,) or sk6.shape[1:] != k6.shape[1:] \
            or sv6.shape[1:] != v6.shape[1:]:
        raise ValueError("source and destination paged views disagree, or src_slot_mapping "
                         "is not [T]")
    _launch(sk6, sv6, src_slot_mapping, k6, v6, slot_mapping, delta, inv_freq, rotary_dim,
            is_neox_style)


def rope_shift_paged_(src_k: torch.Tensor, src_v: torch.Tensor, src_slot_mapping: torch.Tensor,
                      dst_k: torch.Tensor, dst_v: torch.Tensor, slot_mapping: torch.Tensor,
                      delta: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int,
                      is_neox_style: bool) -> None:
    """`rope_shift_` whose token t is read from a paged source: src_k/src_v are paged views
    (as `paged_kv_views` gives, same block shape as the destination) and token t lies at
    src_slot_mapping[t] = block * block_size + offset.  Every source slot must be valid
    (not range-checked on the Triton path)."""
    if _use_triton(dst_k) and src_k.device == dst_k.device:
        rope_shift_paged_triton(src_k, src_v, src_slot_mapping, dst_k, dst_v, slot_mapping,
                                delta, inv_freq, rotary_dim, is_neox_style)
    else:
        rope_shift_paged_reference(src_k, src_v, src_slot_mapping, dst_k, dst_v, slot_mapping,
                                   delta, inv_freq, rotary_dim, is_neox_style)
