from dataclasses import replace

from vllm_promptcache.store.keys import BlockKeyer, ModelFingerprint

FP = ModelFingerprint(model="/models/a", revision=None, dtype="torch.bfloat16",
                      kv_cache_dtype="auto", block_size=4, num_layers=2, num_kv_heads=2,
                      head_size=32, tp_size=1, tp_rank=0, weights="dir:abc")


def test_only_full_blocks_get_keys_and_keys_are_deterministic():
    keyer = BlockKeyer(FP)
    tokens = list(range(10))
    keys = keyer.block_keys(tokens)
    assert len(keys) == 2  # 10 tokens, blocks of 4: the partial third block has no key
    assert keys == BlockKeyer(FP).block_keys(tokens)
    assert len(set(keys)) == 2


def test_keys_are_chained_over_the_whole_prefix():
    keyer = BlockKeyer(FP)
    a = keyer.block_keys([1, 2, 3, 4, 5, 6, 7, 8])
    b = keyer.block_keys([9, 2, 3, 4, 5, 6, 7, 8])  # same second block, other first block
    assert a[0] != b[0]
    assert a[1] != b[1], "a block's key must depend on every token before it"
    assert keyer.block_keys([1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0])[:2] == a, "a prefix keeps its keys"


def test_every_fingerprint_field_changes_every_key():
    tokens = list(range(8))
    base = BlockKeyer(FP).block_keys(tokens)
    changes = dict(model="/models/b", revision="v2", dtype="torch.float16", kv_cache_dtype="fp8",
                   num_layers=3, num_kv_heads=4, head_size=64, tp_size=2, tp_rank=1,
                   weights="dir:def", config="c2", hf_overrides='{"x":1}',
                   rope='{"rope_scaling":{"factor":2}}', quantization='{"method":"fp8"}',
                   kv_scales='{"calculate":true}', kv_layout="device=cuda,backend=auto,layout=LBNHC",
                   format_version=99)
    for field, value in changes.items():
        other = BlockKeyer(replace(FP, **{field: value})).block_keys(tokens)
        assert not set(other) & set(base), f"changing {field} must change the keys"


def test_cache_salt_separates_keys():
    keyer = BlockKeyer(FP)
    tokens = list(range(8))
    plain, a, a2, b = (keyer.block_keys(tokens), keyer.block_keys(tokens, "tenant-a"),
                       keyer.block_keys(tokens, "tenant-a"), keyer.block_keys(tokens, "tenant-b"))
    assert a == a2
    assert not set(a) & set(b) and not set(a) & set(plain)


def test_max_blocks_truncates():
    keyer = BlockKeyer(FP)
    assert keyer.block_keys(list(range(40)), max_blocks=3) == keyer.block_keys(list(range(12)))


def test_the_kv_layout_is_in_the_fingerprint():
    """A CPU engine's block ([h, bs, 2d]) and a CUDA engine's of the same shape order
    their bytes differently: the engines' fingerprints differ (issue 29, point 4)."""
    from types import SimpleNamespace as NS

    from vllm_promptcache import compat

    cpu = compat.kv_block_layout(NS(cache_config=NS(kv_cache_layout="LBHNC")))
    other = compat.kv_block_layout(NS(cache_config=NS(kv_cache_layout="LBNHC")))
    assert "layout=LBHNC" in cpu and "device=" in cpu and cpu != other
    assert replace(FP, kv_layout=cpu).digest() != replace(FP, kv_layout=other).digest()
