"""Prompt modules on the OpenAI server: a registration file at start-up, the HTTP
route (register, list, refusal over the cap), and requests naming modules through
`kv_transfer_params`.

One server: `vllm-promptcache serve MODEL --promptcache --promptcache-modules FILE`
with a 2 MiB host tier (32 blocks, 16 of them for pinned modules) and vLLM's
prefix cache off, so every reuse is a load the metrics count.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import settled
from tests.modules.test_prompt_modules import text
from tests.test_server import COMMON, Server, free_port
from vllm_promptcache.metrics import parse_prometheus

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("modules-server")
    modules_file = tmp / "modules.json"
    modules_file.write_text(json.dumps({"sys": text(60, 1), "docA": text(170, 2)}))
    port = free_port()
    srv = Server([sys.executable, "-m", "vllm_promptcache", "serve", tiny_model, "--port", str(port),
                  "--promptcache", "--promptcache-modules", str(modules_file),
                  "--promptcache-host-gb", "0.002", "--promptcache-disk-gb", "0",
                  "--no-enable-prefix-caching", *COMMON], port, tmp / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def post(server, body):
    import requests

    return requests.post(server.base + "/v1/promptcache/modules", json=body, timeout=120)


def complete(server, model, prompt, **params):
    import requests

    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    if params:
        body["kv_transfer_params"] = params
    return requests.post(server.base + "/v1/completions", json=body, timeout=120)


def hits(server):
    """(hit tokens, shifted-hit tokens) once the last steps have reported."""
    import requests

    def read():
        snap = parse_prometheus(requests.get(server.base + "/metrics", timeout=10).text)
        return (snap.get("hit_tokens_total", {}).get("host", 0.0),
                snap.get("shifted_hit_tokens_total", {}).get("host", 0.0))

    return settled(read, tries=20, pause=0.3)


def test_file_modules_are_registered_at_start_up(server):
    import requests

    listed = requests.get(server.base + "/v1/promptcache/modules", timeout=10).json()["modules"]
    assert {m["name"] for m in listed} == {"sys", "docA"}
    assert all(m["tokens"] >= 100 for m in listed)


def test_route_registers_a_module_and_requests_reuse_it_in_any_order(server, tiny_model):
    r = post(server, {"name": "docB", "text": text(170, 3)})
    assert r.status_code == 200, r.text
    assert r.json()["modules"][0]["blocks"] == 3
    before = hits(server)
    r = complete(server, tiny_model, "yacht " + text(20, 11),
                 promptcache_modules=["sys", "docB", "docA"])
    assert r.status_code == 200, r.text
    after = hits(server)
    # BOS + sys + docB + docA is ~708 tokens: five whole blocks are loaded, four of
    # them (all but BOS + sys) at a new position.
    assert after[0] - before[0] == 5 * 128
    assert after[1] - before[1] > 3 * 128


def test_a_module_at_its_own_position_answers_as_without_the_cache(server, tiny_model):
    question = "zebra " + text(30, 10)
    cached = complete(server, tiny_model, question, promptcache_modules=["docA"])
    plain = complete(server, tiny_model, question, promptcache_modules=["docA"],
                     promptcache_load=False)
    assert cached.status_code == plain.status_code == 200
    assert cached.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]


def test_unknown_module_in_a_request_is_a_400_naming_it(server, tiny_model):
    r = complete(server, tiny_model, "hello", promptcache_modules=["sys", "nope"])
    assert r.status_code == 400
    assert "'nope'" in r.text and "registered modules" in r.text


def test_registration_over_the_cap_is_refused_with_507(server):
    r = post(server, {"name": "huge", "text": text(760, 20)})
    assert r.status_code == 507, r.text
    assert "'huge'" in r.text and "--promptcache-host-gb" in r.text
    import requests

    names = {m["name"] for m in
             requests.get(server.base + "/v1/promptcache/modules", timeout=10).json()["modules"]}
    assert "huge" not in names


def test_bad_registration_bodies_are_400(server):
    assert post(server, {"text": "no name"}).status_code == 400
    r = post(server, {"name": "short", "text": "too short"})
    assert r.status_code == 400 and "at least 32 tokens" in r.text


def test_malformed_promptcache_options_are_a_400(server, tiny_model):
    r = complete(server, tiny_model, "hello", promptcache_recompute_ratio=2)
    assert r.status_code == 400 and "promptcache_recompute_ratio" in r.text
    r = complete(server, tiny_model, "hello", promptcache_modules="sys")
    assert r.status_code == 400 and "list of module names" in r.text
