"""Prompt modules on the OpenAI server: a registration file at start-up, the HTTP
route (register, list, refusal over the cap), and requests naming modules through
`kv_transfer_params`.

One server: `vllm-promptcache serve MODEL --promptcache --promptcache-modules FILE`
with a 2 MiB host tier (32 blocks, 16 of them for pinned modules) and vLLM's
prefix cache off, so every reuse is a load the metrics count.  It has vLLM's
`--api-key` and the plugin's `--promptcache-admin-key`: registering needs both.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import KV_SCALE, settled
from tests.modules.test_prompt_modules import text
from tests.test_server import COMMON, Server, free_port
from vllm_promptcache.metrics import parse_prometheus

pytestmark = pytest.mark.server

API_KEY = "client-api-key-0123456789"
ADMIN_KEY = "operator-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {**AUTH, "X-PromptCache-Admin-Key": ADMIN_KEY}
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("modules-server")
    modules_file = tmp / "modules.json"
    modules_file.write_text(json.dumps({"sys": text(60, 1), "docA": text(170, 2)}))
    port = free_port()
    srv = Server([sys.executable, "-m", "vllm_promptcache", "serve", tiny_model, "--port", str(port),
                  "--promptcache", "--promptcache-modules", str(modules_file),
                  "--promptcache-host-gb", str(0.002 * KV_SCALE), "--promptcache-disk-gb", "0",
                  "--promptcache-admin-key", ADMIN_KEY, "--api-key", API_KEY,
                  "--promptcache-max-request-bytes", str(MAX_BODY),
                  "--promptcache-max-module-tokens", "1600",
                  "--no-enable-prefix-caching", *COMMON], port, tmp / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def post(server, body, headers=ADMIN):
    import requests

    return requests.post(server.base + "/v1/promptcache/modules", json=body, headers=headers,
                         timeout=120)


def listed(server):
    import requests

    r = requests.get(server.base + "/v1/promptcache/modules", headers=AUTH, timeout=10)
    return {m["name"] for m in r.json()["modules"]}


def complete(server, model, prompt, **params):
    import requests

    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    if params:
        body["kv_transfer_params"] = params
    return requests.post(server.base + "/v1/completions", json=body, headers=AUTH, timeout=120)


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

    modules = requests.get(server.base + "/v1/promptcache/modules", headers=AUTH,
                           timeout=10).json()["modules"]
    assert {m["name"] for m in modules} == {"sys", "docA"}
    assert all(m["tokens"] >= 100 for m in modules)


def test_route_registers_a_module_and_requests_reuse_it_in_any_order(server, tiny_model):
    r = post(server, {"name": "docB", "text": text(170, 3)})
    assert r.status_code == 200, r.text
    assert r.json()["modules"][0]["blocks"] == 3
    before = hits(server)
    r = complete(server, tiny_model, "yacht " + text(20, 11),
                 promptcache_modules=["sys", "docB", "docA"])
    assert r.status_code == 200, r.text
    after = hits(server)
    # BOS + sys + docB + docA are all loaded (~708 tokens), docB and docA at a new
    # position.
    tok = tokenizer(tiny_model)
    sys_, doc_b, doc_a = (len(tok.encode(t, add_special_tokens=False))
                          for t in (text(60, 1), text(170, 3), text(170, 2)))
    assert after[0] - before[0] == 1 + sys_ + doc_b + doc_a
    assert after[1] - before[1] == doc_b + doc_a


def tokenizer(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def test_a_chat_message_holding_a_module_loads_it_in_place_with_the_text_around_encoded(
        server, tiny_model):
    import requests

    doc = text(170, 2)  # docA, registered from the file
    messages = [{"role": "system", "content": "Answer from the document."},
                {"role": "user", "content": "Document 1:\n" + doc + "Question: what is it?"}]
    body = {"model": tiny_model, "messages": messages, "max_tokens": 8, "temperature": 0,
            "kv_transfer_params": {"promptcache_modules": ["docA"]}}

    def counters():
        snap = parse_prometheus(requests.get(server.base + "/metrics", timeout=10).text)
        return tuple(snap.get(n, {}).get("host", 0.0) for n in
                     ("hit_tokens_total", "shifted_hit_tokens_total", "gap_tokens_total"))

    before = settled(counters, tries=20, pause=0.3)
    r = requests.post(server.base + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    hits, shifted, gaps = (b - a for a, b in zip(before, settled(counters, tries=20, pause=0.3)))
    tok = tokenizer(tiny_model)
    doc_tokens = len(tok.encode(doc, add_special_tokens=False))
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before_doc = len(tok.encode(rendered[:rendered.index(doc)], add_special_tokens=False))
    # The chat markers, the system message and the label before the document are
    # encoded first (the gap encoding; they start the prompt as they start it, so they
    # load as its run's block, exactly); the document loads in place, moved; vLLM
    # computes the rest.
    assert shifted == doc_tokens and hits == before_doc + doc_tokens
    assert gaps == 0


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
    assert "huge" not in listed(server)


def test_bad_registration_bodies_are_400(server):
    assert post(server, {"text": "no name"}).status_code == 400
    r = post(server, {"name": "blank", "text": "   "})
    assert r.status_code == 400 and "non-blank" in r.text


def test_malformed_promptcache_options_are_a_400(server, tiny_model):
    r = complete(server, tiny_model, "hello", promptcache_recompute_ratio=2)
    assert r.status_code == 400 and "promptcache_recompute_ratio" in r.text
    r = complete(server, tiny_model, "hello", promptcache_modules="sys")
    assert r.status_code == 400 and "list of module names" in r.text


def pinned_modules(server):
    import requests

    def read():
        return parse_prometheus(requests.get(server.base + "/metrics", timeout=10).text).get(
            "pinned_modules", 0.0)

    return settled(read, tries=20, pause=0.3)


def test_registration_needs_the_admin_key_and_vllms_api_key(server):
    body = {"name": "docC", "text": text(170, 4)}
    assert post(server, body, headers=AUTH).status_code == 401  # no admin key
    r = post(server, body, headers={**AUTH, "X-PromptCache-Admin-Key": "wrong-key-0123456789"})
    assert r.status_code == 401 and "admin key" in r.text
    # The admin key alone does not pass vLLM's own --api-key check.
    assert post(server, body, headers={"X-PromptCache-Admin-Key": ADMIN_KEY}).status_code == 401
    assert "docC" not in listed(server)
    assert post(server, body).status_code == 200
    assert "docC" in listed(server)


def test_oversize_bodies_and_modules_get_413_naming_the_limit(server):
    r = post(server, {"name": "big", "text": "word " * (MAX_BODY // 4)})
    assert r.status_code == 413 and "--promptcache-max-request-bytes" in r.text
    r = post(server, {"name": "long", "text": text(1100, 5)})  # under the byte cap, over 1600 tokens
    assert r.status_code == 413 and "--promptcache-max-module-tokens" in r.text
    assert not {"big", "long"} & listed(server)


def test_a_client_cannot_register_a_module_on_any_endpoint(server, tiny_model):
    """`promptcache_module` sent by a client -- with or without a guessed token --
    pins nothing, whichever endpoint carries it."""
    import requests

    before_listed, before_pinned = listed(server), pinned_modules(server)
    forged = {"promptcache_module": "evil", "promptcache_module_token": "0" * 64}
    prompt = text(300, 6)  # over two blocks: a module encoding would pin them
    ids = requests.post(server.base + "/tokenize", json={"model": tiny_model, "prompt": prompt},
                        headers=AUTH, timeout=30).json()["tokens"]
    bodies = {
        "/v1/completions": {"model": tiny_model, "prompt": prompt, "max_tokens": 1},
        "/v1/completions (tokens in)": {"model": tiny_model, "prompt": ids, "max_tokens": 1},
        "/v1/chat/completions": {"model": tiny_model, "max_tokens": 1,
                                 "messages": [{"role": "user", "content": prompt}]},
        "/v1/responses": {"model": tiny_model, "input": prompt, "max_output_tokens": 1},
        "/v1/messages": {"model": tiny_model, "max_tokens": 1,
                         "messages": [{"role": "user", "content": prompt}]},
    }
    for name, body in bodies.items():
        route = name.split(" ")[0]
        r = requests.post(server.base + route, json={**body, "kv_transfer_params": dict(forged)},
                          headers=AUTH, timeout=120)
        assert r.status_code in (200, 400, 404, 422), (name, r.status_code, r.text[:300])
    assert listed(server) == before_listed
    assert pinned_modules(server) == before_pinned


def test_deeply_nested_pml_is_a_400(server):
    schema = ('<schema name="deep">' + '<module name="m">' * 500 + "x" + "</module>" * 500
              + "</schema>")
    r = post(server, {"schema": schema})
    assert r.status_code == 400 and "nested deeper" in r.text


def test_without_an_admin_key_http_registration_is_off_with_403(monkeypatch):
    """No engine needed: the check the route runs first."""
    from http import HTTPStatus

    from vllm_promptcache.config import PromptCacheConfig
    from vllm_promptcache.modules import server as server_module

    monkeypatch.setattr(server_module, "_config", PromptCacheConfig().validate())
    status, message = server_module._admin_refusal(ADMIN_KEY)
    assert status == HTTPStatus.FORBIDDEN and "--promptcache-admin-key" in message
    monkeypatch.setattr(server_module, "_config", PromptCacheConfig(admin_key=ADMIN_KEY).validate())
    assert server_module._admin_refusal(ADMIN_KEY) is None
    assert server_module._admin_refusal("x" * 30)[0] == HTTPStatus.UNAUTHORIZED


def test_a_salted_or_opted_out_chat_runs_no_gap_encoding_of_its_text(server, tiny_model):
    """Issue 29, point 5: the gap encoding is a request of its own, stored under no
    salt, which every prompt of its template then loads.  A chat with a cache salt or
    `promptcache_save: false` must not make one: the engine sees exactly its own
    request, and a plain chat of the same template later runs its own encoding."""
    import requests

    def finished():
        text_ = requests.get(server.base + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text_.splitlines()
                   if line.startswith("vllm:request_success_total"))

    for i, extra in enumerate(({"cache_salt": "tenant-a"},
                               {"kv_transfer_params": {"promptcache_modules": ["docA"],
                                                       "promptcache_save": False}})):
        label = f"Private note {i} for one tenant only:\n"
        body = {"model": tiny_model, "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": label + text(170, 2) + "Summary?"}],
                "kv_transfer_params": {"promptcache_modules": ["docA"]}, **extra}
        before = settled(finished, tries=20, pause=0.3)
        r = requests.post(server.base + "/v1/chat/completions", json=body, headers=AUTH,
                          timeout=120)
        assert r.status_code == 200, r.text
        assert settled(finished, tries=20, pause=0.3) - before == 1, extra
    # The same shape without a salt does encode its text between modules (2 requests).
    body["kv_transfer_params"] = {"promptcache_modules": ["docA"]}
    before = settled(finished, tries=20, pause=0.3)
    assert requests.post(server.base + "/v1/chat/completions", json=body, headers=AUTH,
                         timeout=120).status_code == 200
    assert settled(finished, tries=20, pause=0.3) - before == 2
