"""The CPU's shifted loads in C: `cpu_shifted.c`, built once per machine and loaded with
ctypes.

On the CPU, torch moves a shifted load's tokens either one torch call per slice of
tokens (shifted_slices.py) or element by element through index tensors; on packed
pages both cost far more than the bytes (a labelled doc-QA prompt's 6,000 tokens on
vLLM's AMX page layout: ~7 ms a layer against ~0.4 ms for a block copy).  The C loop
moves each token once, whatever the layout, with the rotation's float32 arithmetic
done the way torch does it, so its bytes are the torch paths' bytes
(tests/kernels/test_cpu_native.py).

Built on first use with the system C compiler (``$CC``, else ``cc``; no torch headers)
into ``$PROMPTCACHE_NATIVE_DIR`` (default ``~/.cache/vllm-promptcache/native``),
under a name that hashes the source, the flags and this CPU's flags, so a shared home
on other CPUs builds its own.  The folder is private (0700, this user's: a folder
another user owns is refused, never a predictable shared ``/tmp`` name), and the
library's owner and mode are checked again right before ``CDLL`` loads it.  Where there is no compiler, the build fails, or the
built code does not reproduce torch's bytes on a check run at load, loads stay on the
torch paths and one warning says why.  ``PROMPTCACHE_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import stat
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_shifted.c")
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_state: dict = {}


@dataclass
class NativePlan:
    """A shifted load for the C loop, as pieces: piece p moves length[p] tokens from host
    slot src_slot[p] (block * N + offset) on to paged slot dst_slot[p] on, inside one
    block on each side, K rotated by cos/sin row run[p] (-1: delta 0)."""

    src_slot: np.ndarray   # int64 [pieces]
    dst_slot: np.ndarray   # int64 [pieces]
    length: np.ndarray     # int64 [pieces]
    run: np.ndarray        # int32 [pieces]
    cos: np.ndarray        # float32 [angle rows, rotary_dim // 2]
    sin: np.ndarray
    max_src_block: int
    max_dst_block: int

    @property
    def pieces(self) -> int:
        return int(self.length.size)

    @property
    def tokens(self) -> int:
        return int(self.length.sum())


def plan_native(src_slots, src_offsets, dst_slots, deltas, block_size: int,
                inv_freq: torch.Tensor) -> NativePlan:
    """A load's tokens (int64 arrays or CPU tensors, destination -1 = skip) as a
    `NativePlan`: cut into pieces where the source or destination stops being the next
    slot of the same block or the delta changes (a few numpy operations, none per
    token); one angle row per distinct nonzero delta, float64 then float32 as
    `rope_shift_reference` computes them."""
    def arr(a):
        return np.ascontiguousarray(np.asarray(a.numpy() if isinstance(a, torch.Tensor) else a,
                                               dtype=np.int64))
    ss, so, dst, dl = (arr(a) for a in (src_slots, src_offsets, dst_slots, deltas))
    keep = dst >= 0
    if not keep.all():
        ss, so, dst, dl = ss[keep], so[keep], dst[keep], dl[keep]
    uniq, inverse = np.unique(dl, return_inverse=True)
    moved = uniq != 0
    row_of = np.full(len(uniq), -1, dtype=np.int32)
    row_of[moved] = np.arange(int(moved.sum()), dtype=np.int32)
    inv = inv_freq.detach().to("cpu", torch.float64).flatten()
    ang = torch.from_numpy(uniq[moved].astype(np.float64))[:, None] * inv[None, :]
    src = ss * block_size + so
    follows = ((src[1:] == src[:-1] + 1) & (so[1:] != 0) & (dst[1:] == dst[:-1] + 1)
               & (dst[1:] % block_size != 0) & (dl[1:] == dl[:-1]))
    starts = np.flatnonzero(np.concatenate(([True], ~follows))) if src.size else src
    length = np.diff(np.append(starts, src.size)).astype(np.int64)
    row = row_of[inverse.reshape(-1)][starts]
    return NativePlan(np.ascontiguousarray(src[starts]), np.ascontiguousarray(dst[starts]),
                      np.ascontiguousarray(length), np.ascontiguousarray(row, dtype=np.int32),
                      np.ascontiguousarray(ang.cos().to(torch.float32).numpy()),
                      np.ascontiguousarray(ang.sin().to(torch.float32).numpy()),
                      int(ss.max()) if ss.size else -1,
                      int(dst.max() // block_size) if dst.size else -1)


def native_dtypes() -> tuple[torch.dtype, ...]:
    """The cache dtypes the C loop moves."""
    return tuple(_DTYPES)


# ------------------------------------------------------------------------- building

def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    env = os.environ.get("PROMPTCACHE_NATIVE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "vllm-promptcache" / "native"


class NotPrivate(RuntimeError):
    """A folder or library another user could have written: never loaded."""


def _private_folder(folder: Path) -> Path:
    """`folder`, created 0700 if missing; one of ours is tightened to 0700, one that is
    a symlink or another user's is refused (whoever can write it picks our code)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise NotPrivate(f"{folder} is not a directory of this user (uid {st.st_uid})")
    if st.st_mode & 0o077:
        os.chmod(folder, 0o700)
    return folder


def _check_private(lib: Path) -> None:
    """Raise NotPrivate unless `lib` is a regular file of this user that nobody else
    can write, in a 0700 folder of this user: checked right before CDLL runs it."""
    folder = os.lstat(lib.parent)
    if not stat.S_ISDIR(folder.st_mode) or folder.st_uid != os.getuid() \
            or folder.st_mode & 0o077:
        raise NotPrivate(f"{lib.parent} is not a 0700 directory of this user")
    st = os.lstat(lib)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise NotPrivate(f"{lib} is not a file of this user that only it can write "
                         f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")


def _folders() -> list[Path]:
    """Where the library may be built: the per-user cache, else a per-user folder in
    the temporary directory (never a name another user could create first and own)."""
    return [_cache_dir(), Path(tempfile.gettempdir()) / f"vllm-promptcache-native-{os.getuid()}"]


def _build(cc: str) -> Path:
    """The shared library's path, compiled there first if needed (atomically: another
    process may be building the same name), in a private folder and checked."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join([cc] + CFLAGS).encode(),
                                     _cpu_flags().encode(), platform.machine().encode()]))
    name = f"cpu_shifted-{key.hexdigest()[:16]}.so"
    why = []
    for folder in _folders():
        lib = folder / name
        try:
            _private_folder(folder)
            if os.path.lexists(lib):
                try:
                    _check_private(lib)
                    return lib
                except NotPrivate as e:  # ours to replace: the folder is ours and private
                    logger.warning("promptcache: rebuilding the C loop: %s", e)
                    os.unlink(lib)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
        except (OSError, NotPrivate) as e:
            why.append(str(e))
            continue
        try:
            proc = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
            os.chmod(tmp, 0o700)
            os.replace(tmp, lib)
            return lib
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"no private writable folder for the built library: {'; '.join(why)}")


def _load(cc: str):
    lib_path = _build(cc)
    _check_private(lib_path)
    lib = ctypes.CDLL(str(lib_path))
    fn = lib.pc_shifted_move
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, i64, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int,
                   ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr]
    fn.restype = i64
    return fn


def _matching_arithmetic(fn) -> int | None:
    """Which of the C loop's two orders of arithmetic (0: product then add, 1: fused
    multiply-add) writes torch's bytes here, checked on every dtype and both pairings;
    None if neither does."""
    from .rope_shift import rope_shift_paged_reference

    gen = torch.Generator().manual_seed(0)
    T, H, D, N = 77, 3, 64, 16
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    src = torch.arange(T) * 2 % (4 * N)
    dst = torch.randperm(6 * N, generator=gen)[:T]  # distinct slots
    deltas = (torch.arange(T) // 20 * 977 + 3).to(torch.int64)
    for fused in (0, 1):
        ok = True
        for dtype in _DTYPES:
            for neox, rotary_dim in ((True, D), (False, D), (True, 24), (False, 10)):
                host = torch.randn(4, N, H, D, generator=gen).to(dtype) * 4
                hk, hv = host, host.flip(0)
                want_k, want_v = (torch.zeros(6, N, H, D, dtype=dtype) for _ in range(2))
                freqs = inv_freq[:rotary_dim // 2]
                rope_shift_paged_reference(hk, hv, src, want_k, want_v, dst, deltas, freqs,
                                           rotary_dim, neox)
                got_k, got_v = (torch.zeros(6, N, H, D, dtype=dtype) for _ in range(2))
                plan = plan_native(src // N, src % N, dst, deltas, N, freqs)
                _call(fn, fused, [(hk, hv, got_k, got_v)], plan, rotary_dim, neox)
                ok &= all(torch.equal(w.view(torch.uint8), g.view(torch.uint8))
                          for w, g in ((want_k, got_k), (want_v, got_v)))
        if ok:
            return fused
    return None


def native_move():
    """(C function, arithmetic) once built and checked on this machine, else None (and
    a warning, once, saying why)."""
    with _lock:
        if "fn" not in _state:
            _state["fn"] = None
            if os.environ.get("PROMPTCACHE_NATIVE", "1") == "0":
                logger.info("promptcache: C shifted loads off (PROMPTCACHE_NATIVE=0)")
            else:
                cc = os.environ.get("CC", "cc")
                try:
                    fn = _load(cc)
                    fused = _matching_arithmetic(fn)
                    if fused is None:
                        raise RuntimeError("its rotation does not reproduce torch's bytes here")
                    _state["fn"] = (fn, fused)
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    logger.warning("promptcache: shifted loads stay on the torch paths on this "
                                   "CPU (the C loop is unavailable: %s)", e)
        return _state["fn"]


# -------------------------------------------------------------------------- running

def _geometry(view: torch.Tensor) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(block stride, head stride, token offsets [N], head-dim offsets [D]) in elements,
    of a 4-D [B, N, H, D] or 6-D packed [B, G, TG, H, DG, DGs] paged view."""
    st = view.stride()
    if view.dim() == 4:
        _, N, _, D = view.shape
        return st[0], st[2], np.arange(N) * st[1], np.arange(D) * st[3]
    _, G, TG, _, DG, DGs = view.shape
    o, d = np.arange(G * TG), np.arange(DG * DGs)
    return (st[0], st[3], o // TG * st[1] + o % TG * st[2], d // DGs * st[4] + d % DGs * st[5])


def _layout(view: torch.Tensor) -> tuple:
    return view.shape, view.stride(), view.dtype


def _prepare(fn, fused: int, layers, plan: NativePlan, rotary_dim: int,
             is_neox_style: bool):
    """`layers`, 4-tuples of views (src K, src V, dst K, dst V) laid out alike
    (`_layout`), checked and tabled once: returns run(first, count), which moves layers
    [first, first + count) through the C loop (the first layer's geometry serves all)."""
    views = layers[0]
    dtype = views[0].dtype
    if any(v.dtype != dtype or v.device.type != "cpu" for v in views):
        raise ValueError("C shifted loads move CPU tensors of one dtype")
    src_k, src_v, dst_k, dst_v = views
    geo = [_geometry(v) for v in views]
    N, D = len(geo[0][2]), len(geo[0][3])
    H = src_k.shape[3] if src_k.dim() == 6 else src_k.shape[2]
    if any(len(g[2]) != N or len(g[3]) != D for g in geo):
        raise ValueError("source and destination views disagree on block or head size")
    if plan.max_src_block >= min(src_k.shape[0], src_v.shape[0]) \
            or plan.max_dst_block >= min(dst_k.shape[0], dst_v.shape[0]):
        raise IndexError(f"a token's block is outside the views (source block "
                         f"{plan.max_src_block} of {src_k.shape[0]}, destination "
                         f"{plan.max_dst_block} of {dst_k.shape[0]})")
    first = [_layout(v) for v in views]
    if any([_layout(v) for v in layer] != first for layer in layers[1:]):
        raise ValueError("the layers of one C call must be laid out alike")
    strides = np.array([s for g in geo for s in g[:2]], dtype=np.int64)
    tok_off = np.ascontiguousarray(np.concatenate([g[2] for g in geo]), dtype=np.int64)
    dim_off = np.ascontiguousarray(np.concatenate([g[3] for g in geo]), dtype=np.int64)
    bases = (ctypes.c_void_p * (4 * len(layers)))(
        *(v.data_ptr() for layer in layers for v in layer))
    head = (_DTYPES[dtype], plan.pieces, H, D, N, rotary_dim, int(is_neox_style), fused,
            plan.src_slot.ctypes.data, plan.dst_slot.ctypes.data, plan.length.ctypes.data,
            plan.run.ctypes.data, plan.cos.ctypes.data, plan.sin.ctypes.data)
    tail = (strides.ctypes.data, tok_off.ctypes.data, dim_off.ctypes.data)
    base_addr, ptr_bytes = ctypes.addressof(bases), ctypes.sizeof(ctypes.c_void_p)

    def run(first_layer: int = 0, count: int | None = None) -> None:
        # The closure keeps plan, bases and tables alive while a call may run.
        if count is None:
            count = len(layers) - first_layer
        if first_layer < 0 or count < 0 or first_layer + count > len(layers):
            raise IndexError(f"layers [{first_layer}, {first_layer + count}) of {len(layers)}")
        keep = (plan, bases, strides, tok_off, dim_off)  # noqa: F841
        moved = fn(*head, count, base_addr + 4 * first_layer * ptr_bytes, *tail)
        if moved < 0:
            raise MemoryError("the C loop could not allocate its offset tables")

    return run


def _call(fn, fused: int, layers, plan: NativePlan, rotary_dim: int,
          is_neox_style: bool) -> None:
    """One call of the C loop for `layers` laid out alike (see `_prepare`)."""
    _prepare(fn, fused, layers, plan, rotary_dim, is_neox_style)()


def move_layer_native(src_k: torch.Tensor, src_v: torch.Tensor, dst_k: torch.Tensor,
                      dst_v: torch.Tensor, plan: NativePlan, rotary_dim: int,
                      is_neox_style: bool) -> None:
    """One layer of a shifted load through the C loop (`native_move()` must have
    returned it): host slots' paged views -> the layer's paged views."""
    move_layers_native([(src_k, src_v, dst_k, dst_v)], plan, rotary_dim, is_neox_style)


def prepare_layers_native(layers, plan: NativePlan, rotary_dim: int,
                          is_neox_style: bool) -> list:
    """`move_layers_native` one layer at a time: a callable per layer of `layers` (in
    order) that moves that layer; checks and offset tables are built here, once per
    group of layers laid out alike, so a call costs only the C loop (the CPU's
    layer-wise loads call them from their own thread as the forward goes)."""
    fn, fused = native_move()
    layers = list(layers)
    layouts = [tuple(_layout(v) for v in layer) for layer in layers]
    groups: dict[tuple, list[int]] = {}
    for i, lay in enumerate(layouts):
        groups.setdefault(lay, []).append(i)
    calls: list = [None] * len(layers)
    for members in groups.values():
        run = _prepare(fn, fused, [layers[i] for i in members], plan, rotary_dim,
                       is_neox_style)
        for k, i in enumerate(members):
            calls[i] = functools.partial(run, k, 1)
    return calls


def move_layers_native(layers, plan: NativePlan, rotary_dim: int,
                       is_neox_style: bool) -> None:
    """Every layer of a shifted load, `layers` a sequence of view 4-tuples (src K, src V,
    dst K, dst V), through the C loop (`native_move()` must have returned it): layers
    laid out like the first (the usual case: vLLM allocates every layer alike) share one
    call, whose offset tables and checks are built once; any other layer gets its own."""
    fn, fused = native_move()
    layers = list(layers)
    if not layers:
        return
    layouts = [[_layout(v) for v in layer] for layer in layers]
    alike = [layer for layer, lay in zip(layers, layouts) if lay == layouts[0]]
    _call(fn, fused, alike, plan, rotary_dim, is_neox_style)
    for layer, lay in zip(layers, layouts):
        if lay != layouts[0]:
            _call(fn, fused, [layer], plan, rotary_dim, is_neox_style)
