"""vLLM's step timings as the scheduler side reads them (step_timing.py)."""

from types import SimpleNamespace

import pytest

from vllm_promptcache.connector.load_cost import LoadCost
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
    assert seen == [(512, 100, 0.25)]  # the decode step is no prefill observation
    assert timings.fixed_step_s == pytest.approx(0.05)
    timings.scheduled(SimpleNamespace(num_scheduled_tokens={}, total_num_scheduled_tokens=0))
    now[0] = 20.0
    timings.scheduled(step({"b": 1}, computed={"b": 64}))  # after an empty step: nothing
    assert len(seen) == 1


def test_decode_steps_are_the_fixed_cost_and_do_not_drown_the_prefill_rate():
    """A small model on a CPU: a decode step takes 60 ms, prefill runs at 250 tokens/s.
    Hundreds of decode steps between prefills must leave the rate at 250, not at the
    17 tokens/s one decode token per 60 ms would give."""
    cost = LoadCost()
    now = [0.0]
    timings = StepTimings(cost.observe_prefill, clock=lambda: now[0])
    position = 0
    for turn in range(6):
        prompt = 300 + 100 * turn
        # the prefill step, sharing it with a running request's decode
        timings.scheduled(step({f"r{turn}": prompt, "bg": 1}, new=(f"r{turn}",),
                               computed={f"r{turn}": position, "bg": 10}))
        now[0] += 0.06 + prompt / 250.0
        for _ in range(150):
            timings.scheduled(step({f"r{turn}": 1, "bg": 1}))
            now[0] += 0.06
        position += prompt
    assert cost.prefill.measured
    assert cost.prefill.tokens_per_second() == pytest.approx(250.0, rel=0.05)
    assert timings.fixed_step_s == pytest.approx(0.06, rel=0.01)


def test_mixed_steps_count_only_their_prefill_tokens():
    now = [0.0]
    seen = []
    timings = StepTimings(lambda *obs: seen.append(obs), clock=lambda: now[0])
    timings.scheduled(step({"a": 1, "b": 1}))
    now[0] = 0.1
    timings.scheduled(step({"a": 1, "b": 1, "c": 200}, new=("c",), computed={"c": 32}))
    now[0] = 1.1
    timings.scheduled(step({"a": 1, "b": 1, "c": 1}))
    assert seen == [(200, 32, pytest.approx(0.9))]


def test_a_steps_tokens_and_the_largest_prefills_position():
    from vllm_promptcache.connector.step_timing import step_tokens

    cached = SimpleNamespace(req_ids=["d1", "long", "d2"], num_computed_tokens=[700, 1200, 90])
    new = [SimpleNamespace(req_id="first", num_computed_tokens=64)]
    step = step_tokens(SimpleNamespace(
        num_scheduled_tokens={"d1": 1, "first": 300, "long": 512, "d2": 1, "idle": 0},
        scheduled_new_reqs=new, scheduled_cached_reqs=cached))
    assert (step.prefill_tokens, step.decode_tokens, step.context) == (812, 2, 1200)
    assert step.req_ids == {"d1", "first", "long", "d2", "idle"}
    # The largest prefill is a new request: its position comes from the new list.
    step = step_tokens(SimpleNamespace(num_scheduled_tokens={"first": 600, "long": 512},
                                       scheduled_new_reqs=new, scheduled_cached_reqs=cached))
    assert step.context == 64
    # A decode-only step has no prefill position.
    step = step_tokens(SimpleNamespace(num_scheduled_tokens={"d1": 1, "d2": 1},
                                       scheduled_new_reqs=[], scheduled_cached_reqs=cached))
    assert (step.prefill_tokens, step.decode_tokens, step.context) == (0, 2, 0)
