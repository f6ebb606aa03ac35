"""Shared fixtures: the tiny model, and vLLM engines that whole test modules share."""

from __future__ import annotations

import logging
import os
import tempfile

import pytest

# Engines in tests are CPU engines; keep vLLM from warning about unknown env vars
# of ours being set by a test and from binding all cores to one process.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# A calibration record in this user's cache (`vllm-promptcache calibrate` run by hand)
# would change the recompute ratio of every position-independent test engine: the
# suite ignores them; tests/test_calibration.py turns them on where it tests them.
os.environ.setdefault("PROMPTCACHE_CALIBRATION", "off")
# The disk tier is on by default; tests never write into the user's cache directory.
os.environ.setdefault("PROMPTCACHE_DISK_PATH",
                      tempfile.mkdtemp(prefix="vllm-promptcache-test-kv-"))

# PROMPTCACHE_TEST_DEVICE=cuda runs the engine tests on a GPU (bench/gpu_suite.py):
# CUDA graphs stay on there (the connector asks for PIECEWISE), and bf16 is native.
TEST_DEVICE = os.environ.get("PROMPTCACHE_TEST_DEVICE", "cpu")

if TEST_DEVICE == "cpu":
    # Every test engine's worker bound as the benchmarks bind it (cpu_host.py): one
    # CPU for the engine process, the others for the worker's OpenMP threads.  vLLM's
    # default binding on a 2-core machine leaves its threads unbound once a connector
    # reserves a core; bound, the CPU they leave free carries the connector's
    # layer-wise loads (connector/cpu_layer_loads.py), so every engine test runs them.
    from vllm_promptcache.cpu_host import bind_threads

    bind_threads()


def _test_dtype() -> str:
    """bf16 where the hardware has it; on a CPU without bf16 instructions vLLM's
    bf16 matmuls run ~5x slower than fp32 (cpu_host.pick_dtype)."""
    from vllm_promptcache.cpu_host import pick_dtype

    return pick_dtype(os.environ.get("PROMPTCACHE_TEST_DTYPE"), TEST_DEVICE)


# Every engine's KV pool, explicit: 256 MiB holds 512k tokens of the tiny model.  A
# share of memory (gpu_memory_utilization) is not portable on CPU: vLLM's CPU worker
# takes that share of its NUMA node's memory minus its own RSS, and a node's size
# varies between machines (8 of 24 GiB on one of ours, where 0.05 left a negative
# pool).  With an explicit size and eager mode vLLM also skips its warm-up forward.
KV_POOL_BYTES = 256 << 20

ENGINE_DEFAULTS = dict(
    kv_cache_memory_bytes=KV_POOL_BYTES,
    max_model_len=2048,
    dtype=_test_dtype(),
    seed=0,
)
# Host tiers sized for the tiny model's bf16 KV hold half as many blocks in float32 (CPUs
# without bf16 instructions): such sizes are multiplied by this.
KV_SCALE = 2 if ENGINE_DEFAULTS["dtype"] == "float32" else 1
if TEST_DEVICE == "cpu":
    ENGINE_DEFAULTS["enforce_eager"] = True
else:
    ENGINE_DEFAULTS["gpu_memory_utilization"] = 0.3  # the model's room; the pool is explicit


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from vllm_promptcache.tiny_model import build_model

    return build_model("tiny")


def make_llm(model: str, **kwargs):
    from vllm import LLM, SamplingParams

    llm = LLM(model, **{**ENGINE_DEFAULTS, **kwargs})
    # vLLM 0.32's CPU worker dies (SIGILL) when an engine's very first forward is
    # a prompt of a few tokens; after one longer prompt, short ones are fine.
    llm.generate([{"prompt_token_ids": list(range(100, 300))}], SamplingParams(max_tokens=1),
                 use_tqdm=False)
    return llm


def plugin_engine(model: str, *, prefix_caching: bool = False, max_model_len: int = 2048,
                  **options):
    """A test module's engine with the plugin, for its module-scoped fixture
    (`yield from plugin_engine(tiny_model, host_gb=..., position_independent=True)`):
    `options` are `engine_kwargs`'s, with the disk tier off unless given."""
    from vllm_promptcache import engine_kwargs

    llm = make_llm(model, enable_prefix_caching=prefix_caching, max_model_len=max_model_len,
                   **engine_kwargs(**{"disk_gb": 0, **options}))
    yield llm
    close_llm(llm)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real redis-server of the test module's own (tests/redis_server.py): the store
    its engines share."""
    from tests.redis_server import RedisServer, _need_redis

    _need_redis()
    server = RedisServer(str(tmp_path_factory.mktemp("redis"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llm(request, tiny_model):
    """The test module's engine: `plugin_engine` with the module's ENGINE options (a
    module that needs another kind of engine defines its own `llm` fixture)."""
    yield from plugin_engine(tiny_model, **request.module.ENGINE)


@pytest.fixture(scope="module")
def modules(request, llm):
    """`PromptModules` of the module's engine, the module's MODULES registered."""
    from vllm_promptcache import PromptModules

    pm = PromptModules(llm)
    pm.register_modules(request.module.MODULES)
    return pm


# LoRA on the engines that serve adapters (test_no_wrong_token, the fuzz).
LORA = dict(enable_lora=True, max_lora_rank=8, max_loras=2, max_cpu_loras=4)


# The references carry a connector that does nothing (tests/noop_connector.py): on AMX
# CPUs vLLM's own tokens change with any connector configured.
REFERENCE_CONNECTOR = {"kv_transfer_config": {
    "kv_connector": "NoopConnector", "kv_role": "kv_both",
    "kv_connector_module_path": "tests.noop_connector"}}


@pytest.fixture(scope="session")
def reference(tiny_model):
    """vLLM without the plugin (an empty connector, REFERENCE_CONNECTOR), prefix caching
    on: the reference the engine test modules compare greedy tokens and logprobs
    against, started once for the session.  Without the plugin it registers no
    prompt-cache metrics, so `read_metrics` still reads the newest plugin engine."""
    llm = make_llm(tiny_model, enable_prefix_caching=True, max_model_len=4096,
                   **REFERENCE_CONNECTOR)
    yield llm
    close_llm(llm)


@pytest.fixture(scope="session")
def lora_adapters(tiny_model, tmp_path_factory) -> dict[str, str]:
    """Adapters A, B, C (seeds 1, 2, 3), the same files for every module: vLLM caches a
    loaded adapter by its int id, so the shared `lora_reference` must always see id 1
    as A and id 2 as B."""
    from tests.adapters import write_lora_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {name: write_lora_adapter(str(root / name), tiny_model, seed)
            for name, seed in (("A", 1), ("B", 2), ("C", 3))}


@pytest.fixture(scope="session")
def lora_reference(tiny_model):
    """`reference` with LoRA on (adapters from `lora_adapters`, ids 1 and 2)."""
    llm = make_llm(tiny_model, enable_prefix_caching=True, max_model_len=4096, **LORA,
                   **REFERENCE_CONNECTOR)
    yield llm
    close_llm(llm)


def close_llm(llm) -> None:
    from vllm_promptcache.compat import shutdown_llm

    shutdown_llm(llm)


def settled(read, step=None, tries: int = 30, pause: float = 0.1):
    """`read()` once two reads in a row agree.  Connector stats travel with engine
    steps, so the last step's numbers arrive a step late: `step()` (a request too
    short to save anything) pushes them out."""
    import time

    last = None
    for _ in range(tries):
        if step is not None:
            step()
        value = read()
        if value == last:
            return value
        last = value
        time.sleep(pause)
    return value


@pytest.fixture(scope="module")
def triton_interpreter():
    """Kernels dispatch CPU tensors to the interpreted Triton kernel while this is set
    (a module that uses it marks itself `usefixtures("triton_interpreter")`)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old


def pytest_addoption(parser):
    parser.addoption("--fuzz-sequences", type=int, default=200,
                     help="request sequences of the differential fuzz "
                          "(tests/test_fuzz_no_wrong_token.py); the suite runs 200")
    parser.addoption("--fuzz-concurrent-rounds", type=int, default=3,
                     help="rounds of the concurrent fuzz (tests/test_fuzz_concurrent.py), "
                          "the exact engine restarted every second one; the suite runs 3")


@pytest.fixture
def plugin_log(caplog):
    """caplog that sees the plugin's logger: once vLLM configured logging in this test
    process, 'vllm.*' loggers no longer propagate to the root, where caplog listens."""
    logger = logging.getLogger("vllm.promptcache")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
