"""A worker-side save always reports its request, even when something in it raises:
vLLM gets the blocks back and the host slots never stay PENDING."""

import queue
import threading

from vllm_promptcache.connector.metadata import BlockTransfer
from vllm_promptcache.connector.worker import PromptCacheWorker
from vllm_promptcache.metrics import PromptCacheStats


def bare_worker():
    w = object.__new__(PromptCacheWorker)
    w._saved, w._failed, w.secondary = queue.SimpleQueue(), set(), {}
    w._stats, w._stats_lock = PromptCacheStats(), threading.Lock()
    w.slot_bytes, w.buffer = 1024, None
    return w


def test_an_exception_anywhere_in_a_save_reports_it_failed(monkeypatch):
    w = bare_worker()

    def boom(*a, **k):
        raise RuntimeError("a bug past the copy")

    monkeypatch.setattr(w, "_save_and_stage", boom)
    w._save("r1", BlockTransfer("r1", [3, 4], [0, 1]), [], None)
    done, _ = w.get_finished(set())
    assert done == {"r1"}
    assert w.build_worker_meta().failed_saves == {"r1"}


def test_a_failed_copy_reports_the_save_failed(monkeypatch):
    w = bare_worker()

    def fail_copy(*a, **k):
        raise OSError("copy failed")

    monkeypatch.setattr(w, "_copy_out", fail_copy)
    w._save("r2", BlockTransfer("r2", [1], [5]), [], None)
    done, _ = w.get_finished(set())
    assert done == {"r2"} and w.build_worker_meta().failed_saves == {"r2"}


def test_a_good_save_reports_success(monkeypatch):
    w = bare_worker()
    monkeypatch.setattr(w, "_copy_out", lambda *a, **k: None)
    w._save("r3", BlockTransfer("r3", [1], [5]), [], None)
    assert w.get_finished(set())[0] == {"r3"} and w.build_worker_meta() is None
