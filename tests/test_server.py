"""The OpenAI-compatible server: `--promptcache` on vLLM's CLI, a 3-turn chat, /metrics.

Two servers run side by side: `vllm-promptcache serve MODEL --promptcache` (the
`vllm serve` CLI, launched through our shim because the CPU build's `vllm` command
cannot start) with vLLM's prefix cache off, so every reuse is a host-tier hit, and
vLLM's own api_server module without the flag as the reference.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REFERENCE_CONNECTOR
from vllm_promptcache.metrics import parse_prometheus

pytestmark = pytest.mark.server

from tests.conftest import ENGINE_DEFAULTS, TEST_DEVICE

COMMON = [*(["--enforce-eager"] if TEST_DEVICE == "cpu" else []), "--max-model-len", "2048",
          "--kv-cache-memory-bytes", str(ENGINE_DEFAULTS["kv_cache_memory_bytes"]),
          "--dtype", ENGINE_DEFAULTS["dtype"], "--seed", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, argv: list[str], port: int, log_path):
        self.port = port
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300) -> None:
        import requests

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   + open(self.log_path).read()[-4000:])
            try:
                if requests.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError("server did not become ready:\n" + open(self.log_path).read()[-4000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("servers")
    port = free_port()
    cached = Server([sys.executable, "-m", "vllm_promptcache", "serve", tiny_model, "--port",
                     str(port), "--promptcache", "--promptcache-host-gb", "0.05",
                     "--no-enable-prefix-caching", *COMMON], port, logs / "cached.log")
    ref_port = free_port()
    # vLLM with an empty connector, as the offline references (tests/noop_connector.py).
    reference = Server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                        tiny_model, "--port", str(ref_port), "--kv-transfer-config",
                        json.dumps(REFERENCE_CONNECTOR["kv_transfer_config"]), *COMMON],
                       ref_port, logs / "reference.log")
    try:
        cached.wait_ready()
        reference.wait_ready()
        yield cached, reference
    finally:
        cached.stop()
        reference.stop()


def chat(server, model, messages):
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key="none")
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=32,
                                       temperature=0, seed=0)
    return r.choices[0].message.content


def host_hits(server) -> float:
    import requests

    snap = parse_prometheus(requests.get(server.base + "/metrics", timeout=10).text)
    return snap.get("hit_tokens_total", {}).get("host", 0.0)


def test_three_chat_turns_reuse_host_kv_and_match_the_reference(servers, tiny_model):
    import requests

    cached, reference = servers
    system = " ".join(json.__doc__.split()) + " " + " ".join(socket.__doc__.split())
    questions = ["What does the json module do?", "And what about sockets?",
                 "Summarise both in one line."]
    history = [{"role": "system", "content": system}]
    hits = []
    for q in questions:
        history.append({"role": "user", "content": q})
        answer = chat(cached, tiny_model, history)
        assert answer == chat(reference, tiny_model, history), f"turn {len(hits) + 1} differs"
        history.append({"role": "assistant", "content": answer})
        hits.append(host_hits(cached))
    assert hits[0] == 0, "turn 1 has nothing to reuse"
    assert hits[1] > 0, "turn 2 reuses turn 1's KV from the host tier"
    assert hits[2] > hits[1], "turn 3 reuses turn 2's KV from the host tier"
    # The reference has no prompt-cache metrics at all.
    assert "vllm:promptcache_" not in requests.get(reference.base + "/metrics").text


# Bad start-ups: (launcher, bad options, what the error must name).
BAD_STARTS = {
    "api-server-host-gb": (["-m", "vllm.entrypoints.openai.api_server", "--model"],
                           ["--promptcache-host-gb", "-1"], "--promptcache-host-gb"),
    "serve-host-gb": (["-m", "vllm_promptcache", "serve"], ["--promptcache-host-gb", "huge"],
                      "--promptcache-host-gb"),
    "serve-eviction-policy": (["-m", "vllm_promptcache", "serve"],
                              ["--promptcache-eviction-policy", "random"],
                              "--promptcache-eviction-policy"),
    "serve-disk-path": (["-m", "vllm_promptcache", "serve"],
                        ["--promptcache-disk-path", "/proc/promptcache-kv"],
                        "--promptcache-disk-path"),
}


@pytest.fixture(scope="module")
def bad_starts(tiny_model, tmp_path_factory):
    """Every bad start-up of this module launched at once: each spends its time
    importing vLLM before it fails, so the cores run them side by side.
    {name: (process, log path)}; the YAML case is "yaml"."""
    d = tmp_path_factory.mktemp("bad-starts")
    yaml = d / "pc.yaml"
    yaml.write_text(json.dumps({"host_gb": 1, "disk": "yes"}))
    argvs = {name: [*launcher, tiny_model, "--promptcache", *bad, *COMMON]
             for name, (launcher, bad, _) in BAD_STARTS.items()}
    argvs["yaml"] = ["-m", "vllm_promptcache", "serve", tiny_model, "--promptcache",
                     "--promptcache-config", str(yaml), *COMMON]
    procs = {}
    for name, argv in argvs.items():
        log = d / f"{name}.log"
        with open(log, "w") as f:
            procs[name] = (subprocess.Popen([sys.executable, *argv], stdout=f,
                                            stderr=subprocess.STDOUT), log)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def failed_start(bad_starts, name) -> str:
    """The output of a start-up that must fail (it must not hang either)."""
    proc, log = bad_starts[name]
    assert proc.wait(timeout=300) != 0
    return log.read_text()


@pytest.mark.parametrize("name", list(BAD_STARTS))
def test_bad_config_stops_start_up_with_a_clear_error(bad_starts, name):
    err = failed_start(bad_starts, name)
    assert BAD_STARTS[name][2] in err and any(
        why in err for why in ("allowed", "not a float", "not writable")), err[-2000:]
    assert "Initializing a V1 LLM engine" not in err, "the error must come before any engine starts"


def test_bad_yaml_file_is_refused(bad_starts):
    assert "unknown promptcache option 'disk'" in failed_start(bad_starts, "yaml")


def test_an_over_long_chat_gets_vllms_usual_error_without_truncation(servers, tiny_model):
    """Without --promptcache-truncate nothing is dropped: vLLM refuses the request as
    usual, and the server goes on serving."""
    from openai import BadRequestError

    cached, _ = servers
    words = " ".join(" ".join(t.split()) for t in (json.__doc__, socket.__doc__) * 6).split()
    history = [{"role": "user", "content": " ".join(words[:3000])}]
    with pytest.raises(BadRequestError, match="maximum context length"):
        chat(cached, tiny_model, history)
    assert chat(cached, tiny_model, [{"role": "user", "content": "Still there?"}])
