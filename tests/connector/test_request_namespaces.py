"""A request's namespace names its salt and LoRA adapter unambiguously: no salt a
client can send spells another request's salt and adapter (point 6 of issue 29)."""

from __future__ import annotations

from vllm_promptcache.connector.request_keys import RequestKeys, lora_identity
from vllm_promptcache.store.keys import BlockKeyer, derived_namespace, namespace_of

from .test_request_keys import FP, lora, make_request, write_adapter


def test_a_salt_that_spells_a_lora_is_another_namespace(tmp_path):
    write_adapter(str(tmp_path / "A"), seed=1)
    adapter = lora("A", str(tmp_path / "A"))
    keys = RequestKeys(BlockKeyer(FP))
    with_lora = make_request("with-lora", cache_salt="t", lora_request=adapter)
    forged = make_request("forged", cache_salt="t\0" + lora_identity(adapter))
    assert keys.namespace(with_lora) != keys.namespace(forged)
    # The old "\0".join made these two equal; segments are matched on the namespace.
    assert "\0".join(["salt:t", lora_identity(adapter)]) == "salt:t\0" + lora_identity(adapter)


def test_namespace_encoding_is_injective():
    assert namespace_of() is None
    seen = {namespace_of(*parts) for parts in
            [("a",), ("a", ""), ("", "a"), ("a\0b",), ("a", "b"), ("1:a",), ("1:a", "1:b"),
             ("1:a1:b",)]}
    assert len(seen) == 8


def test_derived_namespaces_equal_no_request_namespace():
    requests = {namespace_of("salt:derived|"), namespace_of("salt:x"), None}
    derived = {derived_namespace(None, "approximate", "r1"),
               derived_namespace(namespace_of("salt:x"), "approximate", "r1"),
               derived_namespace(None, "approximate", "r2"),
               derived_namespace(None, "gap", "r1")}
    assert len(derived) == 4 and not derived & requests
