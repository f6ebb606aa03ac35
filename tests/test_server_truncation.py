"""`--promptcache-truncate` on the OpenAI server: a chat that outgrows max_model_len
drops its oldest turns (system prompt and newest turns kept), says so in the log,
and the kept turns' KV is loaded at its new position (shifted hits on /metrics)."""

from __future__ import annotations

import json
import re
import os
import socket
import sys

import pytest

from tests.test_server import COMMON, Server, chat, free_port
from vllm_promptcache.metrics import parse_prometheus

pytestmark = pytest.mark.server

TEXTS = [json.__doc__, socket.__doc__, os.__doc__, sys.__doc__, pytest.__doc__ or "", str.__doc__]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("trunc")
    port = free_port()
    srv = Server([sys.executable, "-m", "vllm_promptcache", "serve", tiny_model, "--port",
                  str(port), "--promptcache", "--promptcache-truncate", *COMMON,
                  "--max-model-len", "1024"], port, logs / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def metric(server, name):
    import requests

    snap = parse_prometheus(requests.get(server.base + "/metrics", timeout=10).text)
    return snap.get(name, {}).get("host", 0.0)


def test_an_over_long_chat_drops_oldest_turns_and_reuses_the_rest(server, tiny_model):
    words = " ".join(" ".join(t.split()) for t in TEXTS).split()
    # About 130 tokens a message: several turns fit in the window, so after the
    # first drop most of the history is kept.
    history = [{"role": "system", "content": " ".join(words[:40])}]
    pos = 40
    for turn in range(12):
        history.append({"role": "user", "content": " ".join(words[pos:pos + 40])})
        pos += 40
        answer = chat(server, tiny_model, history)  # must not fail once over the window
        history.append({"role": "assistant", "content": answer})
        if "dropped its" in open(server.log_path).read():
            break
    else:
        pytest.fail("the conversation never outgrew max_model_len")
    log = open(server.log_path).read()
    assert re.search(r"conversation over max_model_len=1024: dropped its \d+ oldest message", log)
    # One more turn: the previous (already truncated) prompt's kept turns are reused.
    history.append({"role": "user", "content": " ".join(words[pos:pos + 40])})
    chat(server, tiny_model, history)
    assert metric(server, "shifted_hit_tokens_total") > 0
