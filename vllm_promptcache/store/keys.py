"""Block keys: a chained hash over each block's token ids and everything else that
shapes its KV, seeded by the model's fingerprint.

Two blocks share a key only if the model fingerprint (weights, config, dtypes,
KV layout, TP layout, the plugin's KV format), the request's cache salt, the
per-block extra keys vLLM's own prefix cache uses (LoRA adapter, multimodal
items with their offsets, prompt-embeds digests; `connector/request_keys.py`
takes them from vLLM) *and* every token up to the block's end are the same.
Chaining makes a key name a whole prefix, as vLLM's own prefix cache does, so a
hit on block i implies the KV of blocks 0..i-1 is the right context.

The fingerprint is what makes the persistent tiers honest across restarts: a
model re-saved in place (same path, other weights), another quantization,
`hf_overrides`, RoPE scaling, KV-cache dtype or KV layout (how the attention
backend orders a block's bytes: a CPU engine's block is not a CUDA engine's)
gives another fingerprint, so old files are misses (and live in another
directory).

A namespace (what separates requests whose equal tokens differ: cache salt,
LoRA adapter) is built from its parts by `namespace_of`, which length-prefixes
each part, so no choice of salt can spell another request's parts; anything
derived from a request's namespace (approximate KV, gap encodings) is named by
`derived_namespace`, which can equal no request's namespace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from array import array
from dataclasses import asdict, dataclass
from typing import Any, Sequence

logger = logging.getLogger("vllm.promptcache")

BlockKey = bytes  # 16-byte digest
KEY_BYTES = 16
# The plugin's own KV format: bump when the bytes saved for a block change meaning.
# 3: namespaces are length-prefixed (namespace_of), the KV layout is fingerprinted.
KV_FORMAT_VERSION = 3

# Files of a model directory whose content is hashed (small: configs, custom code),
# and weight files, of which size, mtime and (safetensors) header are hashed.
_CONFIG_FILE = re.compile(r".*\.(json|py|yaml|yml|txt|model|tiktoken)$")
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|gguf|ckpt|npz|h5|msgpack)$")
_HUB_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")
_MAX_SAFETENSORS_HEADER = 100 << 20


class UnknownWeightsError(RuntimeError):
    """The weights' identity cannot be established (no local files, no hub cache)."""


_EMPTY_KEY_HASH = hashlib.blake2b(digest_size=KEY_BYTES)


def _blake(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for p in parts:
        h.update(p)
    return h.digest()


def _safetensors_header(path: str) -> bytes:
    """A safetensors file's JSON header (names, dtypes, shapes, offsets, metadata)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return b""
            (n,) = struct.unpack("<Q", raw)
            return fh.read(min(n, _MAX_SAFETENSORS_HEADER))
    except OSError:
        return b""


def directory_identity(path: str) -> str:
    """Digest of a local model or adapter directory: the content of its config
    files, and each weight file's name, size, mtime and safetensors header.  A
    re-save in place changes at least the mtimes, so the digest changes."""
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    found = False
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            try:
                st = os.stat(full)
            except OSError:
                continue
            if _WEIGHT_FILE.match(name):
                found = True
                h.update(f"w|{rel}|{st.st_size}|{st.st_mtime_ns}|".encode())
                if name.endswith(".safetensors"):
                    h.update(_safetensors_header(full))
            elif _CONFIG_FILE.match(name) and st.st_size <= 64 << 20:
                found = True
                h.update(f"c|{rel}|{st.st_size}|".encode())
                try:
                    with open(full, "rb") as fh:
                        h.update(fh.read())
                except OSError:
                    h.update(b"unreadable")
    if not found:
        raise UnknownWeightsError(f"{path} holds no config or weight files")
    return "dir:" + h.hexdigest()


def weights_identity(model: str, revision: str | None, model_id: str = "") -> str:
    """What names the weights: the operator's explicit id, the hub commit of a
    hub-cached model, or the digest of a local directory."""
    if model_id:
        return "id:" + model_id
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        real = os.path.realpath(path)
        m = _HUB_SNAPSHOT.search(real + "/")
        # A hub snapshot is content-addressed, but a local edit would still change
        # the files: the digest covers both.
        digest = directory_identity(real)
        return f"hub:{m.group(1)}|{digest}" if m else digest
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - any failure means "not resolvable"
        cached = None
    if isinstance(cached, str):
        m = _HUB_SNAPSHOT.search(os.path.dirname(cached) + "/")
        if m:
            return "hub:" + m.group(1)
    raise UnknownWeightsError(
        f"cannot tell which weights {model!r} (revision {revision or 'default'}) are: not a "
        f"local directory and not in the hub cache")


def namespace_of(*parts: str) -> str | None:
    """The namespace of a request whose keys depend on `parts` besides its tokens
    (e.g. "salt:...", "lora:..."), None for no parts.  Each part is length-prefixed,
    so the encoding is injective: salt "t\\0lora:x" alone never equals salt "t" under
    LoRA "x", whatever bytes a client puts in its salt."""
    if not parts:
        return None
    return "".join(f"{len(p)}:{p}" for p in parts)


def derived_namespace(namespace: str | None, *parts: str) -> str:
    """The namespace of KV derived from a request's (approximate KV, a gap encoding):
    its own namespace plus `parts`, tagged so that it equals no request's namespace
    and no other derivation's, e.g. derived_namespace(ns, "approximate", req_id)."""
    return "derived|" + namespace_of(namespace or "", *parts)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr, separators=(",", ":"))


def _hf_overrides(value: Any) -> str:
    if callable(value):  # its effect is in the config; name it without an address
        return "callable:" + getattr(value, "__qualname__", type(value).__name__)
    return _json(value or {})


@dataclass(frozen=True)
class ModelFingerprint:
    """Everything about an engine that changes the bytes of a KV block."""

    model: str
    dtype: str
    kv_cache_dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_size: int
    tp_size: int
    tp_rank: int
    weights: str = ""      # weights_identity(); "" where unknown (persistent tiers off)
    revision: str | None = None
    config: str = ""       # digest of the effective HF config (after hf_overrides)
    hf_overrides: str = ""
    rope: str = ""         # RoPE scaling / parameters
    quantization: str = ""  # method and its config
    kv_scales: str = ""    # how KV-cache scales are chosen
    kv_layout: str = ""    # the device and the attention backend's block layout
    format_version: int = KV_FORMAT_VERSION

    def digest(self) -> bytes:
        text = "|".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))
        return _blake(text.encode())

    @property
    def persistent(self) -> bool:
        """Known weights: KV may be kept across restarts (disk, shared tiers)."""
        return bool(self.weights)

    def describe(self) -> str:
        return f"{self.digest().hex()} (model {self.model}, weights {self.weights or 'unknown'})"

    @classmethod
    def from_vllm_config(cls, vllm_config: Any, tp_rank: int = 0,
                         model_id: str = "") -> "ModelFingerprint":
        from ..compat import kv_block_layout  # the one place that knows vLLM's versions

        mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
        try:
            weights = weights_identity(str(mc.model), mc.revision, model_id)
        except UnknownWeightsError as e:
            logger.warning("promptcache: %s; KV is kept in host RAM only (pass "
                           "--promptcache-model-id to name the weights)", e)
            weights = ""
        hf_config = getattr(mc, "hf_config", None)
        try:
            config = hf_config.to_dict() if hf_config is not None else {}
        except Exception:  # noqa: BLE001
            config = repr(hf_config)
        rope = {k: config.get(k) for k in ("rope_scaling", "rope_parameters", "rope_theta",
                                           "max_position_embeddings", "partial_rotary_factor")
                } if isinstance(config, dict) else {}
        quant_config = config.get("quantization_config") if isinstance(config, dict) else None
        return cls(
            model=str(mc.model),
            weights=weights,
            revision=mc.revision,
            config=_blake(_json(config).encode()).hex(),
            hf_overrides=_hf_overrides(getattr(mc, "hf_overrides", None)),
            rope=_json(rope),
            quantization=_json({"method": getattr(mc, "quantization", None),
                                "config": quant_config}),
            dtype=str(mc.dtype),
            kv_cache_dtype=str(cc.cache_dtype),
            kv_scales=_json({"calculate": getattr(cc, "calculate_kv_scales", None),
                             "kv_cache_dtype_skip_layers":
                                 getattr(cc, "kv_cache_dtype_skip_layers", None)}),
            block_size=int(cc.block_size),
            num_layers=int(mc.get_num_layers(pc)),
            num_kv_heads=int(mc.get_num_kv_heads(pc)),
            head_size=int(mc.get_head_size()),
            tp_size=int(pc.tensor_parallel_size),
            tp_rank=int(tp_rank),
            kv_layout=kv_block_layout(vllm_config),
        )


class BlockKeyer:
    """Computes the keys of a token sequence's full blocks."""

    def __init__(self, fingerprint: ModelFingerprint | None, *, seed: bytes | None = None,
                 block_size: int | None = None):
        self.fingerprint = fingerprint
        self.block_size = fingerprint.block_size if fingerprint is not None else int(block_size)
        self._seed = fingerprint.digest() if fingerprint is not None else bytes(seed)

    @classmethod
    def from_digest(cls, digest: bytes, block_size: int) -> "BlockKeyer":
        """The keyer of the fingerprint whose digest is `digest` (what a store knows
        of it): recomputes the keys a shared entry claims for its tokens."""
        return cls(None, seed=digest, block_size=block_size)

    def new_epoch(self) -> None:
        """A cache reset (after a weight update, say): from now on no key equals one
        computed before, so nothing stored before is found again."""
        self._seed = _blake(self._seed, b"epoch:", os.urandom(16))

    def seed(self, namespace: str | None) -> bytes:
        """The chain's seed: the fingerprint, and the request's namespace (cache
        salt, LoRA adapter: what separates requests whose equal tokens differ)."""
        if not namespace:
            return self._seed
        return _blake(self._seed, b"ns:", namespace.encode())

    def block_keys(self, token_ids: Sequence[int], namespace: str | None = None,
                   max_blocks: int | None = None, extra: Sequence[bytes | None] | None = None,
                   start: int = 0, prev: bytes | None = None) -> list[BlockKey]:
        """Keys of the full blocks of `token_ids` (a trailing partial block has none).

        `extra[i]` is block i's extra key bytes (multimodal items, prompt-embeds
        digests), or None.  `start`/`prev` continue a chain: keys of blocks
        start.. given the key of block start-1."""
        n = len(token_ids) // self.block_size
        if max_blocks is not None:
            n = min(n, max_blocks)
        if prev is None:
            prev = self.seed(namespace)
        keys: list[BlockKey] = []
        if n <= start:
            return keys
        bs = self.block_size
        # One conversion for the whole run, then a slice per block: on the scheduler
        # thread, for every new request (a 4k-token prompt in 16-token blocks is 256
        # hashes; converting block by block cost as much as hashing).
        data = array("q", token_ids[start * bs:n * bs]).tobytes()
        step = bs * 8
        for j, i in enumerate(range(start, n)):
            chunk = data[j * step:(j + 1) * step]
            more = extra[i] if extra is not None and i < len(extra) else None
            if more:
                prev = _blake(prev, chunk, b"x:" + more)
            else:
                h = _EMPTY_KEY_HASH.copy()  # cheaper than building a hasher per block
                h.update(prev + chunk)
                prev = h.digest()
            keys.append(prev)
        return keys

    def tail_key(self, prev: bytes | None, namespace: str | None,
                 tail_tokens: Sequence[int]) -> BlockKey:
        """The key of a run's partial last block (its first len(tail_tokens) tokens,
        after the block keyed `prev`): never equal to a full block's key, so exact
        lookups (whole blocks) never find it; position-independent lookups do."""
        if prev is None:
            prev = self.seed(namespace)
        return _blake(prev, b"tail:", array("q", tail_tokens).tobytes())
