"""A KV connector that loads and stores nothing: the reference engines carry it.

On a CPU with AMX tiles (seen on an Intel Xeon with amx_bf16, vLLM 0.32.0), vLLM's own
greedy tokens already change when *any* KV connector is configured: vLLM's
ExampleConnector and this empty one both turned a LoRA request's third token from 895
into 1858 and a plain 266-token conversation's sixth, with nothing loaded or saved,
while without a connector every prefix-cache and hybrid-manager setting agreed.  The
connector's presence (its per-step and per-layer hooks) changes vLLM's numerics there,
not what a cache serves.  So the references compare the plugin with vLLM under the
same hooks, doing nothing in them: a wrong token from our loads still shows, and
vLLM's own AMX near-ties do not.  On CPUs without AMX the two references agree.
"""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata)

class NoopConnector(KVConnectorBase_V1):
    def start_load_kv(self, forward_context, **kwargs) -> None:
        pass

    def wait_for_layer_load(self, layer_name) -> None:
        pass

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        pass

    def wait_for_save(self) -> None:
        pass

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens) -> None:
        pass

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return KVConnectorMetadata()
