import pytest

from vllm_promptcache.config import (EVICTION_POLICIES, PromptCacheConfig, PromptCacheConfigError,
                                     build_config, migrate_legacy_env)
from vllm_promptcache.engine_config import engine_kwargs


def test_defaults_are_valid():
    cfg = build_config(environ={})
    assert cfg == PromptCacheConfig().validate()


@pytest.mark.parametrize("override,flag,allowed", [
    ({"host_gb": 0}, "--promptcache-host-gb", "(0, 4096]"),
    ({"host_gb": -2}, "--promptcache-host-gb", "(0, 4096]"),
    ({"host_gb": 10_000}, "--promptcache-host-gb", "(0, 4096]"),
    ({"eviction_policy": "fifo"}, "--promptcache-eviction-policy", "scheduler-aware, lru"),
    ({"min_load_blocks": 0}, "--promptcache-min-load-blocks", "[1, 1048576]"),
])
def test_bad_values_name_the_option_and_range(override, flag, allowed):
    with pytest.raises(PromptCacheConfigError) as e:
        build_config(overrides=override, environ={})
    assert flag in str(e.value) and allowed in str(e.value)


def test_precedence_yaml_then_env_then_explicit(tmp_path):
    f = tmp_path / "pc.yaml"
    f.write_text("promptcache:\n  host_gb: 1.5\n  min_load_blocks: 3\n")
    assert build_config(f, environ={}).host_gb == 1.5
    env = {"PROMPTCACHE_HOST_GB": "2.5"}
    cfg = build_config(f, environ=env)
    assert cfg.host_gb == 2.5 and cfg.min_load_blocks == 3
    assert build_config(f, {"host_gb": 0.25}, environ=env).host_gb == 0.25
    assert build_config(environ={"PROMPTCACHE_CONFIG": str(f)}).min_load_blocks == 3


def test_yaml_errors_are_clear(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("host_gigs: 3\n")
    with pytest.raises(PromptCacheConfigError, match="unknown promptcache option 'host_gigs'"):
        build_config(bad_key, environ={})
    not_yaml = tmp_path / "b.yaml"
    not_yaml.write_text("host_gb: [1\n")
    with pytest.raises(PromptCacheConfigError, match="not valid YAML"):
        build_config(not_yaml, environ={})
    with pytest.raises(PromptCacheConfigError, match="no such file"):
        build_config(tmp_path / "missing.yaml", environ={})


def test_env_errors_are_clear():
    with pytest.raises(PromptCacheConfigError, match="PROMPTCACHE_HOST_GB.*not a float"):
        build_config(environ={"PROMPTCACHE_HOST_GB": "lots"})
    with pytest.raises(PromptCacheConfigError, match="unknown environment variable PROMPTCACHE_HOSTGB"):
        build_config(environ={"PROMPTCACHE_HOSTGB": "1"})
    assert build_config(environ={"PROMPTCACHE_SAVE_DECODE_TOKENS": "false"}).save_decode_tokens is False


def test_engine_kwargs_names_the_connector(monkeypatch):
    monkeypatch.delenv("PROMPTCACHE_HOST_GB", raising=False)
    kw = engine_kwargs(host_gb=3)
    ktc = kw["kv_transfer_config"]
    assert ktc["kv_connector"] == "PromptCacheConnector"
    assert ktc["kv_connector_module_path"] == "vllm_promptcache.connector"
    assert ktc["kv_connector_extra_config"]["promptcache"]["host_gb"] == 3.0
    with pytest.raises(PromptCacheConfigError, match="--promptcache-host-gb"):
        engine_kwargs(host_gb=-1)


def test_disk_options(tmp_path):
    cfg = build_config(overrides={"disk_path": str(tmp_path / "kv"), "disk_gb": 2}, environ={})
    assert cfg.disk_enabled and cfg.disk_bytes == 2 << 30
    assert cfg.disk_dir == str(tmp_path / "kv") and (tmp_path / "kv").is_dir()
    assert not build_config(overrides={"disk_gb": 0}, environ={}).disk_enabled
    env = {"PROMPTCACHE_DISK_GB": "0.5", "PROMPTCACHE_DISK_PATH": str(tmp_path / "e")}
    cfg = build_config(environ=env)
    assert cfg.disk_gb == 0.5 and cfg.disk_dir == str(tmp_path / "e")
    f = tmp_path / "pc.yaml"
    f.write_text(f"disk_gb: 3\ndisk_path: {tmp_path / 'y'}\neviction_policy: lru\n")
    cfg = build_config(f, environ={})
    assert (cfg.disk_gb, cfg.disk_dir, cfg.eviction_policy) == (3, str(tmp_path / "y"), "lru")
    kw = engine_kwargs(host_gb=1, disk_gb=0)
    assert kw["kv_transfer_config"]["kv_connector_extra_config"]["promptcache"]["disk_gb"] == 0
    assert "disk tier off" in build_config(overrides={"disk_gb": 0}, environ={}).summary()


def test_disk_errors_are_clear(tmp_path):
    with pytest.raises(PromptCacheConfigError, match="--promptcache-disk-gb.*0 turns the disk tier off"):
        build_config(overrides={"disk_gb": -1}, environ={})
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PromptCacheConfigError, match="--promptcache-disk-path.*not writable"):
        build_config(overrides={"disk_path": str(blocker / "kv")}, environ={})
    # With the disk tier off, the path is not touched.
    build_config(overrides={"disk_path": str(blocker / "kv"), "disk_gb": 0}, environ={})


SECRET = "s3cret-0123456789abcdef"
KEY = "admin-0123456789abcdef"


def test_old_variable_names_work_for_one_release_with_a_warning(plugin_log):
    caplog = plugin_log
    cfg = build_config(environ={"VLLM_PROMPTCACHE_HOST_GB": "1.5"})
    assert cfg.host_gb == 1.5
    assert "VLLM_PROMPTCACHE_HOST_GB is deprecated" in caplog.text
    assert "PROMPTCACHE_HOST_GB" in caplog.text
    # The new name wins where both are set.
    assert build_config(environ={"VLLM_PROMPTCACHE_HOST_GB": "1.5",
                                 "PROMPTCACHE_HOST_GB": "2"}).host_gb == 2
    env = {"VLLM_PROMPTCACHE_REMOTE_PASSWORD": "pw", "PROMPTCACHE_NATIVE": "0"}
    migrate_legacy_env(env)
    assert env["PROMPTCACHE_REMOTE_PASSWORD"] == "pw" and env["PROMPTCACHE_NATIVE"] == "0"


def test_eviction_policies_come_from_the_registry():
    from vllm_promptcache.store.policies import POLICIES, policy_class

    assert EVICTION_POLICIES == tuple(POLICIES)
    assert policy_class("scheduler-aware").queue_aware and not policy_class("lru").queue_aware
    with pytest.raises(PromptCacheConfigError, match="one of " + ", ".join(POLICIES)):
        build_config(overrides={"eviction_policy": "fifo"}, environ={})


def test_calibration_modes():
    assert build_config(environ={}).calibration == "enforce"
    assert build_config(environ={"PROMPTCACHE_CALIBRATION": "warn"}).calibration == "warn"
    assert "calibration" in PromptCacheConfig().engine_dict()
    with pytest.raises(PromptCacheConfigError,
                       match="--promptcache-calibration.*'strict'.*enforce, warn, off"):
        build_config(overrides={"calibration": "strict"}, environ={})


def test_a_remote_tier_without_a_usable_secret_is_refused_before_any_engine(monkeypatch):
    monkeypatch.delenv("PROMPTCACHE_REMOTE_SECRET", raising=False)
    url = {"remote_url": "redis://127.0.0.1:6379/0", "disk_gb": 0}
    with pytest.raises(PromptCacheConfigError, match="--promptcache-remote-secret.*required"):
        build_config(overrides=url, environ={})
    with pytest.raises(PromptCacheConfigError, match="--promptcache-remote-secret.*required"):
        engine_kwargs(host_gb=1, **url)
    with pytest.raises(PromptCacheConfigError,
                       match="--promptcache-remote-secret.*got a value of 5 characters"):
        build_config(overrides={**url, "remote_secret": "short"}, environ={})
    assert build_config(overrides=url, environ={"PROMPTCACHE_REMOTE_SECRET": SECRET}).remote_url
    # The engine's copy has no secret: it finds the one the server exported.
    engine_side = {"remote_url": url["remote_url"], "disk_gb": 0}
    with pytest.raises(PromptCacheConfigError, match="remote_secret"):
        PromptCacheConfig.from_dict(engine_side, environ={})
    PromptCacheConfig.from_dict(engine_side, environ={"PROMPTCACHE_REMOTE_SECRET": SECRET})


def test_a_tls_file_that_is_missing_is_refused(tmp_path):
    url = f"rediss://h:6380/0?ssl_ca_certs={tmp_path / 'ca.pem'}"
    with pytest.raises(PromptCacheConfigError, match="--promptcache-remote-url.*ssl_ca_certs"):
        build_config(overrides={"remote_url": url, "remote_secret": SECRET, "disk_gb": 0},
                     environ={})
    (tmp_path / "ca.pem").write_text("x")
    build_config(overrides={"remote_url": url, "remote_secret": SECRET, "disk_gb": 0},
                 environ={})


def test_secrets_come_from_files_and_errors_never_echo_them(tmp_path):
    key_file, secret_file = tmp_path / "key", tmp_path / "secret"
    key_file.write_text(KEY + "\n")
    secret_file.write_text(SECRET + "\n")
    cfg = build_config(overrides={"admin_key_file": str(key_file), "disk_gb": 0,
                                  "remote_secret_file": str(secret_file),
                                  "remote_url": "redis://127.0.0.1:1/0"}, environ={})
    assert (cfg.admin_key, cfg.remote_secret) == (KEY, SECRET)
    engine = cfg.engine_dict()
    assert not {"admin_key", "remote_secret", "admin_key_file", "remote_secret_file",
                "remote_password_file"} & set(engine)
    assert KEY not in cfg.summary() and SECRET not in cfg.summary()
    yaml = tmp_path / "pc.yaml"
    yaml.write_text(f"admin_key_file: {key_file}\n")
    assert build_config(yaml, environ={}).admin_key == KEY
    assert build_config(environ={"PROMPTCACHE_ADMIN_KEY_FILE": str(key_file)}).admin_key == KEY
    with pytest.raises(PromptCacheConfigError, match="not both"):
        build_config(overrides={"admin_key_file": str(key_file), "admin_key": KEY}, environ={})
    # A secret and its file are one option: the higher source's form wins.
    yaml.write_text("admin_key: yaml-0123456789abcdef\n")
    assert build_config(yaml, environ={"PROMPTCACHE_ADMIN_KEY_FILE": str(key_file)}
                        ).admin_key == KEY
    assert build_config(yaml, {"admin_key": "flag-0123456789abcdef"},
                        environ={"PROMPTCACHE_ADMIN_KEY_FILE": str(key_file)}
                        ).admin_key == "flag-0123456789abcdef"
    with pytest.raises(PromptCacheConfigError, match="--promptcache-admin-key-file.*cannot read"):
        build_config(overrides={"admin_key_file": str(tmp_path / "none")}, environ={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(PromptCacheConfigError, match="--promptcache-remote-secret-file.*empty"):
        build_config(overrides={"remote_secret_file": str(tmp_path / "empty")}, environ={})
    with pytest.raises(PromptCacheConfigError) as e:
        build_config(overrides={"admin_key": "short-key"}, environ={})
    assert "short-key" not in str(e.value) and "--promptcache-admin-key" in str(e.value)


def test_the_password_file_and_a_password_in_the_url_are_not_both_given(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("hunter2\n")
    with pytest.raises(PromptCacheConfigError, match="--promptcache-remote-password-file.*not both"):
        build_config(overrides={"remote_url": "redis://:other@127.0.0.1:1/0", "disk_gb": 0,
                                "remote_secret": SECRET, "remote_password_file": str(pw)},
                     environ={})


def test_engine_kwargs_exports_secrets_and_keeps_them_out_of_the_engine_config(tmp_path,
                                                                              monkeypatch):
    import json

    for name in ("PROMPTCACHE_REMOTE_SECRET", "PROMPTCACHE_REMOTE_PASSWORD"):
        monkeypatch.setenv(name, "")  # restored (unset) after the test
        monkeypatch.delenv(name)
    pw = tmp_path / "pw"
    pw.write_text("hunter2-password\n")
    kw = engine_kwargs(host_gb=1, disk_gb=0, remote_url="redis://user@127.0.0.1:1/0",
                       remote_password_file=str(pw), remote_secret=SECRET)
    text = json.dumps(kw)
    assert "hunter2-password" not in text and SECRET not in text and str(pw) not in text
    import os

    assert os.environ["PROMPTCACHE_REMOTE_PASSWORD"] == "hunter2-password"
    assert os.environ["PROMPTCACHE_REMOTE_SECRET"] == SECRET


def test_the_engine_reads_the_variable_the_server_exports():
    from vllm_promptcache.config import REMOTE_SECRET_ENV
    from vllm_promptcache.store import remote_store

    assert remote_store.SECRET_ENV == REMOTE_SECRET_ENV


def test_combinations_that_cannot_work_are_refused_naming_the_field():
    import os

    with pytest.raises(PromptCacheConfigError,
                       match="--promptcache-recompute-ratio.*needs --promptcache-position-independent"):
        build_config(overrides={"recompute_ratio": 0.15}, environ={})
    assert build_config(overrides={"recompute_ratio": 0.15, "truncate": True},
                        environ={}).position_independent
    with pytest.raises(PromptCacheConfigError, match="truncate is done by the OpenAI server"):
        engine_kwargs(host_gb=1, truncate=True)
    missing = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(PromptCacheConfigError, match=f"--promptcache-load-cpu.*'{missing}'"):
        build_config(overrides={"load_cpu": str(missing)}, environ={})
    cpu = str(min(os.sched_getaffinity(0)))
    assert build_config(overrides={"load_cpu": cpu}, environ={}).load_cpu == cpu
