import pytest

from vllm_promptcache.config import PromptCacheConfig, PromptCacheConfigError, build_config
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
    env = {"VLLM_PROMPTCACHE_HOST_GB": "2.5"}
    cfg = build_config(f, environ=env)
    assert cfg.host_gb == 2.5 and cfg.min_load_blocks == 3
    assert build_config(f, {"host_gb": 0.25}, environ=env).host_gb == 0.25
    assert build_config(environ={"VLLM_PROMPTCACHE_CONFIG": str(f)}).min_load_blocks == 3


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
    with pytest.raises(PromptCacheConfigError, match="VLLM_PROMPTCACHE_HOST_GB.*not a float"):
        build_config(environ={"VLLM_PROMPTCACHE_HOST_GB": "lots"})
    with pytest.raises(PromptCacheConfigError, match="unknown environment variable VLLM_PROMPTCACHE_HOSTGB"):
        build_config(environ={"VLLM_PROMPTCACHE_HOSTGB": "1"})
    assert build_config(environ={"VLLM_PROMPTCACHE_SAVE_DECODE_TOKENS": "false"}).save_decode_tokens is False


def test_engine_kwargs_names_the_connector(monkeypatch):
    monkeypatch.delenv("VLLM_PROMPTCACHE_HOST_GB", raising=False)
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
    env = {"VLLM_PROMPTCACHE_DISK_GB": "0.5", "VLLM_PROMPTCACHE_DISK_PATH": str(tmp_path / "e")}
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
