"""compat.keep_worker_cores_with_this_connector: with this connector, vLLM's CPU backend
reserves the cores for its engine process that it reserves without a connector."""

from types import SimpleNamespace

import pytest

omp = pytest.importorskip("vllm.utils.ompmultiprocessing")


def config(connector):
    return SimpleNamespace(
        parallel_config=SimpleNamespace(local_world_size=1, data_parallel_rank_local=None,
                                        _api_process_count=1),
        kv_transfer_config=None if connector is None else SimpleNamespace(kv_connector=connector))


def reserved(connector):
    cfg = config(connector)
    manager = omp.OMPProcessManager(cfg)
    assert cfg.kv_transfer_config is None if connector is None else \
        cfg.kv_transfer_config.kv_connector == connector, "the config was not given back"
    return manager.reserve_cpu_num


def test_this_connector_keeps_the_reservation_vllm_makes_without_one(monkeypatch):
    from vllm_promptcache.compat import keep_worker_cores_with_this_connector

    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    # vLLM's own, whether or not a plugin load in this process installed the patch.
    init = omp.OMPProcessManager.__init__
    monkeypatch.setattr(omp.OMPProcessManager, "__init__", getattr(init, "__wrapped__", init))
    alone = reserved(None)
    assert reserved("PromptCacheConnector") > alone, \
        "vLLM no longer reserves more for a connector: drop this patch"
    assert keep_worker_cores_with_this_connector()
    assert keep_worker_cores_with_this_connector(), "installing twice"
    assert reserved("PromptCacheConnector") == alone
    assert reserved("NixlConnector") > alone, "another connector's reservation changed"
    # An operator's choice still wins.
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    assert reserved("PromptCacheConnector") == 1
