"""Every documented configuration starts a real server and answers a chat as vLLM does,
and every configuration that cannot work is refused before any engine starts.

The configurations, and where each is documented:

- **flag**: `vllm-promptcache serve MODEL --promptcache --promptcache-host-gb GIB`
  (README, "Three ways in"; the README's options table).
- **disk**: `--promptcache-disk-path DIR --promptcache-disk-gb GIB` (options table;
  docs/tiers.md, "Disk tier").
- **remote with disk**: `--promptcache-remote-url redis://...` with
  `--promptcache-remote-secret`, the disk tier on beside it (docs/tiers.md, "Shared
  remote tier"; options table), launched as `python -m vllm.entrypoints.openai.api_server
  --model MODEL --promptcache` (README, "Three ways in": "also works").
- **position-independent**: `--promptcache-position-independent` (options table;
  README and docs/modules.md, "Prompt modules").
- **truncate**: `--promptcache-truncate` (options table).
- **a modules file**: `--promptcache-modules FILE`, a YAML mapping of name: text
  (options table; docs/modules.md, "The OpenAI server").
- **an admin key**: `--promptcache-admin-key KEY` beside vLLM's `--api-key`
  (options table; docs/modules.md, "Registration is an operator's act").
- **YAML**: `--promptcache-config FILE`, keys under `promptcache:` (options table and
  "Precedence" below it).
- **env**: PROMPTCACHE_* variables, the YAML file as PROMPTCACHE_CONFIG (options table,
  "Precedence"; docs/tiers.md for PROMPTCACHE_REMOTE_PASSWORD).

To keep CI short, four servers cover them, one after another (one engine at a time,
COMMON's small pool): flag + disk (vLLM's prefix cache left on, as "no other change"
says); remote with disk through vLLM's own launcher, on a Redis with a password given
as PROMPTCACHE_REMOTE_PASSWORD; position-independent + a modules file + an admin key;
YAML + env + truncate (the YAML file named by PROMPTCACHE_CONFIG, an environment
variable overriding one of its keys, and truncation from YAML).  Each server's
start-up summary must show every value its documented form gave, so one form cannot
hide behind another, and each answers the same chat twice with vLLM's greedy answer
(a reference server without the plugin, run first, gives it).

The refusals are tested without an engine, through `engine_kwargs()` and through vLLM's
own argument parser with the plugin's hooks (plugin.py), as `serve` runs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import sys
import time
from unittest import mock

import pytest

from tests.conftest import REFERENCE_CONNECTOR, settled
from tests.redis_server import REDIS_SERVER, RedisServer
from tests.test_server import COMMON, Server, free_port
from vllm_promptcache import engine_kwargs
from vllm_promptcache.config import LEGACY_ENV_PREFIX, PromptCacheConfig
from vllm_promptcache.metrics import parse_prometheus

SERVE = [sys.executable, "-m", "vllm_promptcache", "serve"]
API_SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
SECRET = "a-secret-every-instance-shares-0123456789"
PASSWORD = "redis-password-0123456789"
API_KEY = "client-api-key-0123456789"
ADMIN_KEY = "operator-admin-key-0123456789"
# Long enough that the engine's first forward is not a short prompt (conftest.make_llm)
# and that the second ask reuses whole blocks.
SYSTEM = " ".join(" ".join(json.__doc__.split()).split()[:150])
CHAT = [{"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What does the json module do?"}]
# Module texts no chat below holds, so every chat is exact.
MODULES = {"sockets": " ".join(socket.__doc__.split()[:80]) + "\n",
           "os": " ".join(os.__doc__.split()[:80]) + "\n"}
# Option variables of ours, from the test's own environment (conftest sets the disk
# path): a server sees only those its documented form gives.
OPTION_VARS = {p + n.upper() for p in ("PROMPTCACHE_", LEGACY_ENV_PREFIX)
               for n in [f.name for f in dataclasses.fields(PromptCacheConfig)]
               + ["config", "remote_password"]}


@contextlib.contextmanager
def serving(launcher, model, argv, log, env=None):
    """A server of one documented form, stopped on exit; its log at INFO, where the
    plugin states the configuration it built."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if k not in OPTION_VARS}
    with mock.patch.dict("os.environ", {**clean, **(env or {}), "VLLM_LOGGING_LEVEL": "INFO"},
                         clear=True):
        server = Server([*launcher, model, "--port", str(port), *argv, *COMMON], port, log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def chat(server, model, messages=CHAT, headers=None):
    import requests

    r = requests.post(server.base + "/v1/chat/completions", headers=headers, timeout=300,
                      json={"model": model, "messages": messages, "max_tokens": 16,
                            "temperature": 0, "seed": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def summary(server) -> str:
    """The configuration the plugin built, as it logged it at start-up."""
    found = re.findall(r"vllm-promptcache enabled: (.*)", open(server.log_path).read())
    assert found, "no start-up summary in the log"
    return found[-1]


def host_hits(server, headers=None) -> float:
    import requests

    def read():
        text = requests.get(server.base + "/metrics", headers=headers, timeout=10).text
        return parse_prometheus(text).get("hit_tokens_total", {}).get("host", 0.0)

    return settled(read, tries=30, pause=0.2)  # stats travel with engine steps


def eventually(check, timeout=20.0):
    """`check()` once it is true (write-through runs after a request has finished)."""
    deadline = time.time() + timeout
    while not (value := check()) and time.time() < deadline:
        time.sleep(0.2)
    return value


def kv_files(root):
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
            and not p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def expected(tiny_model, tmp_path_factory):
    """vLLM's greedy answer to CHAT without the plugin (an empty connector, as every
    engine reference), from a server stopped before the configurations start."""
    log = tmp_path_factory.mktemp("reference") / "reference.log"
    with serving(API_SERVER, tiny_model, ["--kv-transfer-config",
                                          json.dumps(REFERENCE_CONNECTOR["kv_transfer_config"])],
                 log) as ref:
        return chat(ref, tiny_model)


@pytest.mark.server
def test_flag_and_disk(expected, tiny_model, tmp_path):
    disk = tmp_path / "kv"
    with serving(SERVE, tiny_model, ["--promptcache", "--promptcache-host-gb", "0.05",
                                     "--promptcache-disk-path", str(disk),
                                     "--promptcache-disk-gb", "0.1"],
                 tmp_path / "server.log") as server:
        assert "host tier 0.05 GiB" in summary(server)
        assert f"disk tier 0.1 GiB at {disk}" in summary(server)
        assert chat(server, tiny_model) == expected
        assert eventually(lambda: kv_files(disk)), "nothing written through to the disk tier"
        assert chat(server, tiny_model) == expected


@pytest.mark.server
def test_remote_with_disk_through_vllms_own_launcher(expected, tiny_model, tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    redis = RedisServer(str(tmp_path), password=PASSWORD).start()
    disk = tmp_path / "kv"
    try:
        with serving(API_SERVER, tiny_model,
                     ["--promptcache", "--promptcache-host-gb", "0.05",
                      "--promptcache-disk-path", str(disk), "--promptcache-disk-gb", "0.1",
                      "--promptcache-remote-url", redis.url,
                      "--promptcache-remote-secret", SECRET],
                     tmp_path / "server.log", env={"PROMPTCACHE_REMOTE_PASSWORD": PASSWORD}
                     ) as server:
            said = summary(server)
            assert f"disk tier 0.1 GiB at {disk}" in said
            assert f"remote tier: redis://127.0.0.1:{redis.port}," in said  # db not shown
            assert "remote tier is up" in open(server.log_path).read()
            assert chat(server, tiny_model) == expected
            assert eventually(lambda: kv_files(disk)), "nothing written through to disk"
            assert eventually(lambda: redis.client().dbsize() > 0), \
                "nothing written through to the remote store"
            assert chat(server, tiny_model) == expected
    finally:
        redis.stop()


@pytest.mark.server
def test_position_independent_with_a_modules_file_and_an_admin_key(expected, tiny_model,
                                                                   tmp_path):
    import requests

    modules = tmp_path / "modules.yaml"
    modules.write_text("".join(f"{name}: {json.dumps(text)}\n" for name, text in MODULES.items()))
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with serving(SERVE, tiny_model, ["--promptcache", "--promptcache-host-gb", "0.05",
                                     "--promptcache-disk-gb", "0",
                                     "--promptcache-position-independent",
                                     "--promptcache-modules", str(modules),
                                     "--promptcache-admin-key", ADMIN_KEY, "--api-key", API_KEY,
                                     "--no-enable-prefix-caching"],
                 tmp_path / "server.log") as server:
        said = summary(server)
        assert "position-independent reuse: True" in said
        assert f"modules file: {modules}" in said
        assert "module registration over HTTP: on" in said
        route = server.base + "/v1/promptcache/modules"

        def listed():
            r = requests.get(route, headers=auth, timeout=10)
            return {m["name"] for m in r.json()["modules"]}

        assert listed() == set(MODULES), "the file's modules are registered at start-up"
        body = {"name": "late", "text": " ".join(sys.__doc__.split()[:60])}
        assert requests.post(route, headers=auth, json=body, timeout=120).status_code == 401
        r = requests.post(route, headers={**auth, "X-PromptCache-Admin-Key": ADMIN_KEY},
                          json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert listed() == {*MODULES, "late"}
        assert chat(server, tiny_model, headers=auth) == expected
        before = host_hits(server, auth)
        assert chat(server, tiny_model, headers=auth) == expected
        assert host_hits(server, auth) > before, "the second ask reuses the first's KV"


@pytest.mark.server
def test_yaml_env_and_truncate(expected, tiny_model, tmp_path):
    yaml = tmp_path / "promptcache.yaml"
    yaml.write_text("promptcache:\n  truncate: true\n  host_gb: 1\n  disk_gb: 0\n"
                    "  eviction_policy: lru\n")
    env = {"PROMPTCACHE_CONFIG": str(yaml), "PROMPTCACHE_HOST_GB": "0.05",  # over YAML's 1
           "PROMPTCACHE_MIN_LOAD_BLOCKS": "2"}
    with serving(SERVE, tiny_model, ["--promptcache", "--no-enable-prefix-caching"],
                 tmp_path / "server.log", env=env) as server:
        said = summary(server)
        for shown in ("host tier 0.05 GiB", "disk tier off", "eviction lru", "truncate: True",
                      "min load blocks: 2", "position-independent reuse: True"):
            assert shown in said, (shown, said)
        assert "Unknown vLLM environment variable" not in open(server.log_path).read()
        assert chat(server, tiny_model) == expected
        before = host_hits(server)
        assert chat(server, tiny_model) == expected
        assert host_hits(server) > before, "the second ask reuses the first's KV"
        # A conversation over max_model_len (about 2200 tokens, COMMON's 2048) is
        # answered, its oldest turns dropped.
        words = " ".join(" ".join(t.split()) for t in (socket.__doc__, os.__doc__, sys.__doc__,
                                                         str.__doc__, re.__doc__)).split()
        long = [CHAT[0]] + [{"role": ("user", "assistant")[i % 2],
                             "content": " ".join(words[i * 60:(i + 1) * 60])} for i in range(15)]
        assert chat(server, tiny_model, long)
        assert re.search(r"over max_model_len=2048: dropped its \d+ oldest message",
                         open(server.log_path).read())


# ---------------------------------------------------------------------------
# Configurations that cannot work, refused before any engine starts
# ---------------------------------------------------------------------------

URL = "redis://127.0.0.1:1/0"

# name: (engine_kwargs options, CLI arguments after --promptcache, what the error names)
CANNOT_WORK = {
    "remote URL without a secret": (
        {"remote_url": URL}, ["--promptcache-remote-url", URL], "--promptcache-remote-secret"),
    "remote secret too short": (
        {"remote_url": URL, "remote_secret": "short"},
        ["--promptcache-remote-url", URL, "--promptcache-remote-secret", "short"],
        "--promptcache-remote-secret"),
    "a password in the URL and a password file": (
        {"remote_url": "redis://:pw@127.0.0.1:1/0", "remote_secret": SECRET,
         "remote_password_file": "{pw}"},
        ["--promptcache-remote-url", "redis://:pw@127.0.0.1:1/0", "--promptcache-remote-secret",
         SECRET, "--promptcache-remote-password-file", "{pw}"],
        "--promptcache-remote-password-file"),
    "a TLS URL whose CA file is missing": (
        {"remote_url": "rediss://127.0.0.1:1/0?ssl_ca_certs={tmp}/none.pem",
         "remote_secret": SECRET},
        ["--promptcache-remote-url", "rediss://127.0.0.1:1/0?ssl_ca_certs={tmp}/none.pem",
         "--promptcache-remote-secret", SECRET],
        "--promptcache-remote-url"),
    "a URL that is not a store's": (
        {"remote_url": "http://127.0.0.1:1/", "remote_secret": SECRET},
        ["--promptcache-remote-url", "http://127.0.0.1:1/", "--promptcache-remote-secret", SECRET],
        "--promptcache-remote-url"),
    "a recompute ratio without position-independent reuse": (
        {"recompute_ratio": 0.15}, ["--promptcache-recompute-ratio", "0.15"],
        "--promptcache-recompute-ratio"),
    "an admin key and its file": (
        {"admin_key": ADMIN_KEY, "admin_key_file": "{pw}"},
        ["--promptcache-admin-key", ADMIN_KEY, "--promptcache-admin-key-file", "{pw}"],
        "--promptcache-admin-key-file"),
    "a remote secret file that cannot be read": (
        {"remote_url": URL, "remote_secret_file": "{tmp}/none"},
        ["--promptcache-remote-url", URL, "--promptcache-remote-secret-file", "{tmp}/none"],
        "--promptcache-remote-secret-file"),
    "a load CPU this machine does not give the server": (
        {"load_cpu": "{cpu}"}, ["--promptcache-load-cpu", "{cpu}"], "--promptcache-load-cpu"),
    "a disk tier in a directory that cannot be written": (
        {"disk_path": "/proc/promptcache-kv", "disk_gb": 1},
        ["--promptcache-disk-path", "/proc/promptcache-kv", "--promptcache-disk-gb", "1"],
        "--promptcache-disk-path"),
}


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No option variable of ours (a secret in the environment would satisfy a check),
    the disk tier in tmp_path; everything set here is undone after the test."""
    for name in OPTION_VARS | {"PROMPTCACHE_MODULE_TOKEN"}:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("PROMPTCACHE_DISK_PATH", str(tmp_path / "kv"))
    (tmp_path / "pw").write_text("hunter2-password\n")
    return {"tmp": str(tmp_path), "pw": str(tmp_path / "pw"),
            "cpu": str(max(os.sched_getaffinity(0)) + 1)}


def fill(value, where):
    if isinstance(value, str):
        return value.format(**where)
    if isinstance(value, (list, tuple)):
        return type(value)(fill(v, where) for v in value)
    if isinstance(value, dict):
        return {k: fill(v, where) for k, v in value.items()}
    return value


def cli_start(argv):
    """What `serve` does with its arguments before it builds an engine: vLLM's parser
    with the plugin's flags, then `from_cli_args` (plugin.apply_cli_args)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_promptcache.plugin import install_cli_hooks

    install_cli_hooks()
    args = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(argv)
    return AsyncEngineArgs.from_cli_args(args)


def refusal(start) -> str:
    """The message a start that must be refused stops with."""
    from vllm_promptcache.config import PromptCacheConfigError

    with pytest.raises((PromptCacheConfigError, SystemExit)) as e:
        start()
    return str(e.value.code if isinstance(e.value, SystemExit) else e.value)


@pytest.mark.parametrize("name", list(CANNOT_WORK))
def test_a_configuration_that_cannot_work_is_refused_naming_the_field(clean_env, name):
    options, argv, flag = fill(CANNOT_WORK[name], clean_env)
    offline = refusal(lambda: engine_kwargs(host_gb=1, **options))
    assert flag in offline, offline
    served = refusal(lambda: cli_start(["--promptcache", *argv]))
    assert flag in served, served
    assert "PROMPTCACHE_MODULE_TOKEN" not in os.environ, "refused after it began to start"


def test_server_only_forms_are_refused_offline(clean_env, tmp_path):
    modules = tmp_path / "modules.yaml"
    modules.write_text("a: text\n")
    assert "modules_file" in refusal(lambda: engine_kwargs(host_gb=1, modules_file=str(modules)))
    assert "truncate" in refusal(lambda: engine_kwargs(host_gb=1, truncate=True))


def test_the_cli_refuses_what_only_it_can_get_wrong(clean_env, tmp_path):
    assert "need(s) --promptcache" in refusal(
        lambda: cli_start(["--promptcache-host-gb", "1"]))
    assert "--kv-transfer-config" in refusal(lambda: cli_start(
        ["--promptcache", "--kv-transfer-config",
         json.dumps(REFERENCE_CONNECTOR["kv_transfer_config"])]))
    assert "--promptcache-modules" in refusal(lambda: cli_start(
        ["--promptcache", "--promptcache-modules", str(tmp_path / "none.yaml")]))


def test_a_modules_file_that_maps_no_names_to_texts_is_refused_before_any_engine(clean_env,
                                                                                tmp_path):
    modules = tmp_path / "modules.yaml"
    modules.write_text("- just\n- a list\n")
    assert "--promptcache-modules" in refusal(
        lambda: cli_start(["--promptcache", "--promptcache-modules", str(modules)]))


def test_a_host_tier_larger_than_the_machines_memory_is_refused(clean_env):
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    if 2 * memory_gib > 4096:
        pytest.skip("this machine has more memory than the largest host tier")
    too_big = {"host_gb": 2 * memory_gib}
    assert "--promptcache-host-gb" in refusal(lambda: engine_kwargs(**too_big))
    assert "--promptcache-host-gb" in refusal(
        lambda: cli_start(["--promptcache", "--promptcache-host-gb", str(2 * memory_gib)]))
