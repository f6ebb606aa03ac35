"""The worker's GPU data path (connector/gpu_transfer.py) run on CPU tensors with the
Triton kernels interpreted: the host buffer's "device view" is the buffer itself, and
every load, shifted load and save must leave exactly the bytes the torch path (the CPU
backend's) leaves.  Also the staging pool the disk writes lease from, and the connector's
CUDA-graph declaration as vLLM reads it."""

from types import SimpleNamespace

import pytest
import torch

from vllm_promptcache.connector.gpu_transfer import GpuTransfers, IndexStaging, ShiftGeometry
from vllm_promptcache.kernels.block_copy import (
    blocks_first, load_slots_into_blocks, save_blocks_to_slots)
from vllm_promptcache.kernels.shifted_load import load_tokens_shifted
from vllm_promptcache.store.host_buffer import HostBuffer, StagingPool

NUM_BLOCKS, H, N, D = 9, 2, 16, 32
DTYPE = torch.bfloat16


# Run the Triton kernels interpreted (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _layers(seed: int, any_bits: bool = True) -> dict[str, torch.Tensor]:
    """Two layers as vLLM 0.32's FlashAttention allocates them, physical NHD: random bits
    (NaN payloads included) or, for rotations, random normal values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(2):
        n = NUM_BLOCKS * N * H * 2 * D
        if any_bits:
            raw = torch.randint(0, 2**16, (n,), generator=g, dtype=torch.int32)
            raw = raw.to(torch.int16).view(DTYPE)
        else:
            raw = torch.randn(n, generator=g).to(DTYPE)
        out[f"layer.{i}"] = raw.view(NUM_BLOCKS, N, H, 2 * D).permute(0, 2, 1, 3)
    return out


def _pages(raw: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    return [(name, t[0].numel() * t.element_size()) for name, t in raw.items()]


def _mapped(num_slots: int, pages) -> HostBuffer:
    buf = HostBuffer(num_slots, pages, pin=False)
    buf.data.copy_(torch.randint(0, 256, buf.data.shape, dtype=torch.uint8))
    buf.map_to_device(lambda t: t)  # CPU tensors: the "device" is the host
    return buf


def _shift():
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    return ShiftGeometry(inv.float(), D, True, H, D, N, "flash_attn")


def _transfers(raw, buf, shift=None):
    kv = {name: blocks_first(t, NUM_BLOCKS) for name, t in raw.items()}
    return GpuTransfers(kv, raw, buf, shift), kv


def test_block_loads_and_saves_match_the_torch_path():
    raw = _layers(1)
    buf = _mapped(7, _pages(raw))
    ref_buf = HostBuffer(7, _pages(raw), pin=False)
    ref_buf.data.copy_(buf.data)
    gpu, kv = _transfers(raw, buf)

    blocks, slots = [4, 0, 8], [6, 1, 3]
    gpu.save(blocks, buf, slots, ready=None)
    for name, v in kv.items():
        save_blocks_to_slots(v, torch.tensor(blocks), ref_buf.layer_view(name),
                             torch.tensor(slots))
    assert torch.equal(buf.data, ref_buf.data)

    ref_raw = {n: t.clone() for n, t in raw.items()}
    load_blocks, load_slots = [2, 5, 7, 3], [3, 6, 0, 1]
    gpu.start_loads(load_blocks, load_slots, [])
    gpu.end_step()
    _assert_loaded_as_the_torch_path(raw, ref_raw, ref_buf, load_slots, load_blocks)


def _assert_loaded_as_the_torch_path(raw, ref_raw, buf, slots, blocks) -> None:
    """`raw` (loaded by GpuTransfers) holds bit for bit what the torch path leaves in
    `ref_raw` (a copy taken before the load) copying `buf`'s slots into those blocks."""
    for name, t in ref_raw.items():
        load_slots_into_blocks(buf.layer_view(name), torch.tensor(slots),
                               blocks_first(t, NUM_BLOCKS), torch.tensor(blocks))
    for name in raw:
        assert torch.equal(raw[name].contiguous().view(torch.int16),
                           ref_raw[name].contiguous().view(torch.int16))


@pytest.mark.parametrize("first_blocks", [None, [], [5], [2, 3], [3, 7, 2, 5], [8]])
def test_blocks_the_forward_shares_go_first_and_every_block_still_lands(first_blocks):
    """The scheduler names the copied blocks the forward also writes into
    (`PromptCacheMetadata.shared_blocks`); those copies are issued first, the rest after.
    Whichever blocks are named (none, some, all, one not loaded at all), every block gets
    its own slot's bytes, as one torch-path copy of them all leaves it."""
    import numpy as np

    raw = _layers(3)
    buf = _mapped(7, _pages(raw))
    gpu, _ = _transfers(raw, buf)
    ref_raw = {n: t.clone() for n, t in raw.items()}
    load_blocks, load_slots = [2, 5, 7, 3], [3, 6, 0, 1]
    gpu.start_loads(load_blocks, load_slots, [],
                    first_blocks=None if first_blocks is None
                    else np.asarray(first_blocks, dtype=np.int64))
    gpu.end_step()
    _assert_loaded_as_the_torch_path(raw, ref_raw, buf, load_slots, load_blocks)


def test_shifted_loads_match_the_reference(monkeypatch):
    raw = _layers(2, any_bits=False)
    buf = _mapped(5, _pages(raw))
    gpu, _ = _transfers(raw, buf, _shift())
    gpu.save([1, 3, 5, 7, 8], buf, [0, 1, 2, 3, 4], ready=None)  # the host holds real KV
    for t in raw.values():
        t.copy_(torch.randn(t.shape))
    T = 40
    load = SimpleNamespace(src_slots=torch.randint(0, 5, (T,)).tolist(),
                           src_offsets=torch.randint(0, N, (T,)).tolist(),
                           dst_slots=(torch.randperm(NUM_BLOCKS * N)[:T]).tolist(),
                           deltas=[0] * 10 + torch.randint(-3000, 3000, (T - 10,)).tolist())
    ref_raw = {n: t.clone() for n, t in raw.items()}
    gpu.start_loads([], [], [load])
    s = _shift()
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch reference path, as the CPU backend runs
    for name, t in ref_raw.items():
        load_tokens_shifted(buf.layer_view(name), torch.tensor(load.src_slots),
                            torch.tensor(load.src_offsets), t, "flash_attn", H, D, N,
                            torch.tensor(load.dst_slots), torch.tensor(load.deltas),
                            s.inv_freq, D, True)
    for name in raw:
        got, want = raw[name].float(), ref_raw[name].float()
        # Unrotated bytes equal; rotated K within bf16 rounding of the reference.
        assert torch.allclose(got, want, rtol=2 ** -7, atol=2 ** -7 * want.abs().max())
    # Delta-0 tokens: bit-exact.
    for t in range(10):
        blk, off = divmod(load.dst_slots[t], N)
        for name in raw:
            assert torch.equal(raw[name][blk, :, off].view(torch.int16),
                               ref_raw[name][blk, :, off].view(torch.int16))


def test_bad_slots_are_refused_before_any_copy():
    raw = _layers(3)
    buf = _mapped(4, _pages(raw))
    gpu, _ = _transfers(raw, buf)
    before = {n: t.clone() for n, t in raw.items()}
    with pytest.raises(IndexError):
        gpu.start_loads([1], [4], [])
    assert all(torch.equal(before[n].view(torch.int16), raw[n].view(torch.int16)) for n in raw)


def test_index_staging_grows_and_keeps_values():
    staging = IndexStaging(torch.device("cpu"), capacity=4)
    a, b = staging.send([1, 2, 3], [7, 8, 9, 10, 11])
    assert a.tolist() == [1, 2, 3] and b.tolist() == [7, 8, 9, 10, 11]
    assert staging.capacity == 8
    (c,) = staging.send([5])
    assert c.tolist() == [5]


def test_staging_pool_lends_runs_and_takes_them_back():
    pool = StagingPool(10, [("a", 8), ("b", 4)], pin=False)
    first = pool.lease(6)
    second = pool.lease(4)
    assert first is not None and second is not None and pool.lease(1) is None
    first.data.fill_(1)
    second.data.fill_(2)  # the runs do not overlap
    assert int(first.data.sum()) == 6 * 12
    first.release()
    assert pool.free_slots() == 6
    del second  # dropped by its holder (the disk writer): back in the pool
    assert pool.free_slots() == 10 and pool.lease(10) is not None


def test_connector_asks_vllm_for_piecewise_graphs():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from vllm_promptcache import compat

    cfg = KVTransferConfig(kv_connector="PromptCacheConnector", kv_role="kv_both",
                           kv_connector_module_path="vllm_promptcache.connector")
    cls = KVConnectorFactory.get_connector_class(cfg)
    assert compat.piecewise_hook_supported()
    assert cls.requires_piecewise_for_cudagraph(cfg.kv_connector_extra_config) is True
    from vllm.config.compilation import CUDAGraphMode

    assert compat.full_cudagraph_step(SimpleNamespace(cudagraph_runtime_mode=CUDAGraphMode.FULL))
    for mode in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE):
        assert not compat.full_cudagraph_step(SimpleNamespace(cudagraph_runtime_mode=mode))
