"""A request's block keys carry what vLLM's own prefix-cache hash carries (through
vLLM's `generate_block_hash_extra_keys`, on vLLM's own `Request` objects), plus
the LoRA adapter's content; requests that cannot be keyed safely get no keys."""

from __future__ import annotations

import json
import os
import time

import torch

from vllm_promptcache.connector.request_keys import RequestKeys
from vllm_promptcache.store.keys import BlockKeyer, ModelFingerprint

BS = 16
FP = ModelFingerprint("m", "bf16", "auto", BS, 2, 2, 32, 1, 0, weights="id:test")


def make_request(req_id="r", tokens=None, **kw):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    tokens = list(range(100, 100 + 4 * BS + 3)) if tokens is None else tokens
    return Request(req_id, tokens, SamplingParams(max_tokens=4), None, **kw)


def keys_of(request):
    return RequestKeys(BlockKeyer(FP)).keys(request)


def write_adapter(path, scale=0.5, seed=0):
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                   "target_modules": ["q_proj", "v_proj"], "bias": "none"}, f)
    g = torch.Generator().manual_seed(seed)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
               torch.randn(4, 32, generator=g) * scale}, os.path.join(path, "adapter_model.safetensors"))


def lora(name, path, int_id=1):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, int_id, path)


def test_plain_requests_key_on_tokens_only():
    a, b = keys_of(make_request("a")), keys_of(make_request("b"))
    assert a == b and len(a) == 4  # 67 tokens: 4 full blocks, the last token's block excluded


def test_salt_lora_and_adapter_content_separate_keys(tmp_path):
    write_adapter(str(tmp_path / "A"), seed=1)
    write_adapter(str(tmp_path / "B"), seed=2)
    base = keys_of(make_request())
    salted = keys_of(make_request(cache_salt="tenant"))
    with_a = keys_of(make_request(lora_request=lora("A", str(tmp_path / "A"))))
    with_b = keys_of(make_request(lora_request=lora("B", str(tmp_path / "B"), 2)))
    again_a = keys_of(make_request(lora_request=lora("A", str(tmp_path / "A"))))
    assert with_a == again_a, "the same adapter twice hits"
    for x, y in [(base, salted), (base, with_a), (with_a, with_b), (salted, with_a)]:
        assert not set(x) & set(y)
    # The adapter replaced on disk under the same name and path: another adapter.
    time.sleep(0.01)
    write_adapter(str(tmp_path / "A"), seed=3)
    replaced = keys_of(make_request(lora_request=lora("A", str(tmp_path / "A"))))
    assert not set(replaced) & set(with_a)


def test_an_adapter_that_is_not_a_local_directory_is_served_uncached(tmp_path):
    rk = RequestKeys(BlockKeyer(FP))
    req = make_request(lora_request=lora("hub-only", str(tmp_path / "missing")))
    assert rk.keys(req) is None
    assert rk.skip_reason(req) == "lora_unresolved"


def mm_feature(identifier, offset, length):
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    return MultiModalFeatureSpec(data=None, modality="image", identifier=identifier,
                                 mm_position=PlaceholderRange(offset=offset, length=length))


def test_multimodal_items_and_their_offsets_separate_keys_from_their_block_on():
    tokens = [7] * (4 * BS + 3)  # placeholder tokens: equal whatever the image is
    one = keys_of(make_request(tokens=tokens, mm_features=[mm_feature("img-1", 20, 8)]))
    two = keys_of(make_request(tokens=tokens, mm_features=[mm_feature("img-2", 20, 8)]))
    moved = keys_of(make_request(tokens=tokens, mm_features=[mm_feature("img-1", 22, 8)]))
    assert one[0] == two[0] == moved[0], "block 0 holds no image"
    assert one[1] != two[1] and one[1] != moved[1], "the image's block and all after differ"
    assert not set(one[1:]) & set(two[1:])
    rk = RequestKeys(BlockKeyer(FP))
    assert not rk.shiftable(make_request(tokens=tokens, mm_features=[mm_feature("x", 1, 2)]))


def test_a_multimodal_item_without_an_identifier_is_served_uncached():
    rk = RequestKeys(BlockKeyer(FP))
    req = make_request(mm_features=[mm_feature(None, 0, 4)])
    assert rk.keys(req) is None and rk.skip_reason(req) == "mm_no_identifier"


def test_prompt_embeds_separate_keys():
    n = 4 * BS + 3
    g = torch.Generator().manual_seed(0)
    e1, e2 = torch.randn(n, 32, generator=g), torch.randn(n, 32, generator=g)
    zeros = [0] * n  # what vLLM puts in all_token_ids for an embeds-only prompt
    k1 = keys_of(make_request(tokens=zeros, prompt_embeds=e1))
    k1b = keys_of(make_request(tokens=zeros, prompt_embeds=e1.clone()))
    k2 = keys_of(make_request(tokens=zeros, prompt_embeds=e2))
    assert k1 == k1b, "equal embeddings, equal keys"
    assert not set(k1) & set(k2), "other embeddings of the same length share no key"
    assert not set(k1) & set(keys_of(make_request(tokens=zeros)))


def test_keys_are_computed_once_and_extended_as_tokens_grow(monkeypatch):
    from vllm_promptcache import compat

    calls = []
    real = compat.block_extra_keys
    monkeypatch.setattr(compat, "block_extra_keys", lambda *a: calls.append(a[1]) or real(*a))
    rk = RequestKeys(BlockKeyer(FP))
    req = make_request(cache_salt="s")
    first = rk.keys(req)
    assert rk.keys(req) == first and len(calls) == len(first), "asking again recomputes nothing"
    req.append_output_token_ids([5] * BS)
    longer = rk.keys(req)
    assert longer[:len(first)] == first and len(longer) == len(first) + 1
    assert len(calls) == len(longer)
    assert longer == RequestKeys(BlockKeyer(FP)).keys(req), "incremental = from scratch"
