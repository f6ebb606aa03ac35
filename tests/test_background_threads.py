"""The plugin's background threads (saves, disk and remote IO) run on the CPU the load
thread was given, off the forward's, once one is set; before that, where they started."""

import os

import pytest

from vllm_promptcache import background_threads
from vllm_promptcache.background_threads import BackgroundPool


@pytest.fixture
def cpus():
    allowed = sorted(os.sched_getaffinity(0))
    yield allowed
    background_threads.set_cpu(None)


def test_a_pool_moves_its_threads_to_the_background_cpu(cpus):
    cpu = cpus[-1]
    background_threads.set_cpu(cpu)
    with BackgroundPool(2) as pool:
        seen = {frozenset(f.result(10)) for f in
                [pool.submit(os.sched_getaffinity, 0) for _ in range(8)]}
    assert seen == {frozenset({cpu})}
    assert os.sched_getaffinity(0) == set(cpus), "the caller's own thread is not moved"


def test_without_a_background_cpu_threads_stay_where_they_start(cpus):
    background_threads.set_cpu(None)
    with BackgroundPool(1) as pool:
        assert pool.submit(os.sched_getaffinity, 0).result(10) == set(cpus)
    # Results and exceptions still come back through the future.
    with BackgroundPool(1) as pool:
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(10)
