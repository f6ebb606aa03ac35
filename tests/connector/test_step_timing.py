"""vLLM's step timings as the scheduler side reads them (step_timing.py)."""

from types import SimpleNamespace

from vllm_promptcache.connector.step_timing import StepTimings


def step(tokens_by_req, new=(), computed=None):
    computed = computed or {}
    cached = [r for r in tokens_by_req if r not in new]
    return SimpleNamespace(
        num_scheduled_tokens=dict(tokens_by_req),
        total_num_scheduled_tokens=sum(tokens_by_req.values()),
        scheduled_new_reqs=[SimpleNamespace(req_id=r, num_computed_tokens=computed.get(r, 0))
                            for r in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=cached,
                                              num_computed_tokens=[computed.get(r, 0) for r in cached]))


def test_a_step_is_timed_by_the_next_one_only_while_the_engine_ran_without_a_pause():
    now = [0.0]
    seen = []
    timings = StepTimings(lambda *obs: seen.append(obs), clock=lambda: now[0])
    timings.scheduled(step({"a": 512}, new=("a",), computed={"a": 100}))
    now[0] = 0.25
    timings.scheduled(step({"a": 1}, computed={"a": 612}))  # a still runs: no pause
    assert seen == [(512, 100, 0.25)]  # the new tokens start at position 100
    now[0] = 0.3
    timings.scheduled(step({"a": 1}, computed={"a": 613}))
    now[0] = 9.0  # a finished, the engine idled, b arrived: the gap is not a step
    timings.scheduled(step({"b": 64}, new=("b",)))
    assert [(t, c) for t, c, _ in seen] == [(512, 100), (1, 612)]
    assert abs(seen[1][2] - 0.05) < 1e-9
    timings.scheduled(SimpleNamespace(num_scheduled_tokens={}, total_num_scheduled_tokens=0))
    now[0] = 20.0
    timings.scheduled(step({"b": 1}, computed={"b": 64}))  # after an empty step: nothing
    assert len(seen) == 2
