"""What an operator sees when a server starts: no secret in any log line, whichever
way it was given, and every metric the Grafana dashboard reads on /metrics at once.

Two real servers start one after the other (vLLM's logging at DEBUG, the most it
says), on one real Redis that needs a password.  Between them every secret (the
admin key, the remote tier's secret, the store's password) is given as a flag, a
PROMPTCACHE_* variable, a YAML key and a file; in each start a higher source
overrides the lower ones, so each start's log must also hold none of the
overridden values.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from unittest import mock

import pytest

from tests.redis_server import REDIS_SERVER, RedisServer
from tests.test_server import COMMON, Server, free_port

pytestmark = pytest.mark.server

DASHBOARD = Path(__file__).resolve().parent.parent / "examples" / "grafana" / "promptcache.json"


def secret(name: str) -> str:
    return f"{name}-{'x' * 8}-0123456789"


# Every value given anywhere; none may appear in a log.
SECRETS = {n: secret(n) for n in (
    "key-flag", "key-env", "key-yaml", "key-file",
    "remote-env", "remote-yaml", "remote-flag", "remote-file",
    "pw-flag", "pw-env-url", "pw-yaml-url", "pw-env", "pw-file")}


def launch(model, argv, env, log):
    port = free_port()
    with mock.patch.dict("os.environ", {**env, "VLLM_LOGGING_LEVEL": "DEBUG"}):
        server = Server([sys.executable, "-m", "vllm_promptcache", "serve", model, "--port",
                         str(port), "--promptcache", "--promptcache-host-gb", "0.05",
                         "--promptcache-disk-gb", "0.1", *argv, *COMMON], port, log)
    return server


@pytest.fixture(scope="module")
def started(tiny_model, tmp_path_factory):
    """Both servers' logs, and the first one's /metrics before any request."""
    import requests

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    d = tmp_path_factory.mktemp("server-start")
    redis = RedisServer(str(d), password=SECRETS["pw-flag"]).start()
    url = f"redis://127.0.0.1:{redis.port}/0"
    with_pw = lambda pw: f"redis://:{SECRETS[pw]}@127.0.0.1:{redis.port}/0"  # noqa: E731
    files = {}
    for name in ("key-file", "remote-file", "pw-file"):
        files[name] = d / name
        files[name].write_text(SECRETS[name] + "\n")
    try:
        # 1: the admin key and the password from flags, the remote secret from the
        # environment; the YAML file and the variables below them are overridden.
        yaml_a = d / "a.yaml"
        yaml_a.write_text(json.dumps({"admin_key": SECRETS["key-yaml"],
                                      "remote_secret": SECRETS["remote-yaml"],
                                      "remote_url": with_pw("pw-yaml-url")}))
        env_a = {"PROMPTCACHE_CONFIG": str(yaml_a), "PROMPTCACHE_ADMIN_KEY": SECRETS["key-env"],
                 "PROMPTCACHE_REMOTE_SECRET": SECRETS["remote-env"],
                 "PROMPTCACHE_REMOTE_URL": with_pw("pw-env-url")}
        a = launch(tiny_model, ["--promptcache-admin-key", SECRETS["key-flag"],
                                "--promptcache-remote-url", with_pw("pw-flag")],
                   env_a, d / "a.log")
        try:
            a.wait_ready()
            metrics = requests.get(a.base + "/metrics", timeout=10).text
            # A registration with a wrong key, then the right one: nothing logs the key.
            for key in ("wrong-key-0123456789", SECRETS["key-flag"]):
                requests.post(a.base + "/v1/promptcache/modules", timeout=60,
                              headers={"X-PromptCache-Admin-Key": key},
                              json={"modules": {"m": "A short module."}})
        finally:
            a.stop()
        # 2: the files (the admin key's from a flag, the remote secret's from the
        # environment, the password's from YAML, over PROMPTCACHE_REMOTE_PASSWORD) and
        # the remote secret as a flag.
        redis.client().config_set("requirepass", SECRETS["pw-file"])
        yaml_b = d / "b.yaml"
        yaml_b.write_text(json.dumps({"admin_key": SECRETS["key-yaml"], "remote_url": url,
                                      "remote_password_file": str(files["pw-file"])}))
        env_b = {"PROMPTCACHE_CONFIG": str(yaml_b), "PROMPTCACHE_ADMIN_KEY": SECRETS["key-env"],
                 "PROMPTCACHE_REMOTE_SECRET_FILE": str(files["remote-file"]),
                 "PROMPTCACHE_REMOTE_PASSWORD": SECRETS["pw-env"]}
        b = launch(tiny_model, ["--promptcache-admin-key-file", str(files["key-file"]),
                                "--promptcache-remote-secret", SECRETS["remote-flag"]],
                   env_b, d / "b.log")
        try:
            b.wait_ready()
        finally:
            b.stop()
        yield {"a": (d / "a.log").read_text(), "b": (d / "b.log").read_text()}, metrics
    finally:
        redis.stop()


def test_no_secret_appears_in_any_log_line(started):
    logs, _ = started
    for name, log in logs.items():
        assert "non-default args" in log, f"server {name} logged less than expected"
        leaked = [k for k, v in SECRETS.items() if v in log]
        assert not leaked, f"server {name}'s log holds {leaked}"
        # Each server reached the store: the password it used (flag, file) was right.
        assert "remote tier is up" in log, log[-3000:]
        assert "Unknown vLLM environment variable" not in log


def test_every_dashboard_metric_is_on_a_fresh_servers_metrics_page(started):
    _, metrics = started
    used = set(re.findall(r"vllm:[a-z_]+[a-z]", DASHBOARD.read_text())) - {"vllm:promptcache"}
    present = {m.group(1) for m in re.finditer(r"^(vllm:[a-z_:]+?)(?:_created)?[{ ]", metrics,
                                               re.M)}
    assert sorted(used - present) == []
    # Tier-labelled counters exist for each configured tier, at 0.
    for tier in ("host", "disk", "remote"):
        assert re.search(r'^vllm:promptcache_hit_tokens_total\{[^}]*tier="%s"[^}]*\} 0\.0$'
                         % tier, metrics, re.M), tier
