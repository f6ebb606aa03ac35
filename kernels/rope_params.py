"""The served model's RoPE frequencies, for rotating reused K by a position delta.

`rope_shift_` rotates K by ``delta * inv_freq``; that is only right if inv_freq is
exactly what the model's attention used, scaling included (Llama-3, linear, YaRN...).
So nothing is re-derived here: the rotary embedding is built with vLLM's own `get_rope`
from the model config, the way the supported architectures build theirs, and its
frequencies are read from that object -- then checked against the cos/sin table the
object itself computed, so a vLLM change in how a class uses them fails loudly.

Only RoPE variants that are a fixed rotation per position can be shifted: the angle of
position p must be ``p * inv_freq`` (times a constant magnitude, YaRN's mscale).  Not
so: mrope (3-D positions), dual-chunk attention, long-rope (switches tables with the
sequence length), per-layer-type RoPE, multiple linear factors.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

# Architectures whose attention calls get_rope(head_dim, max_position_embeddings,
# is_neox_style=True, rope parameters), as vLLM's llama.py / qwen2.py / qwen3.py do.
SUPPORTED_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})

# Cos/sin table rows checked against the frequencies (small positions: exact in float32).
CHECK_POSITIONS = 8


class UnsupportedRopeError(NotImplementedError):
    pass


def _rope_config(hf: Any) -> dict:
    """RoPE settings in either spelling: `rope_parameters` (vLLM >= 0.12, transformers 5)
    or the older `rope_scaling` (with `type` for `rope_type`)."""
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    params = dict(params)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def _check_shiftable(hf: Any, params: dict) -> None:
    if params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedRopeError("per-layer-type RoPE parameters cannot be shifted (one "
                                   f"inv_freq per model): {sorted(params)}")
    if "mrope_section" in params or params.get("rope_type") == "mrope":
        raise UnsupportedRopeError("mrope (multimodal RoPE) rotates by 3-D positions, not one "
                                   "position: its K cannot be shifted by a scalar delta")
    if getattr(hf, "dual_chunk_attention_config", None):
        raise UnsupportedRopeError("dual-chunk attention RoPE cannot be shifted")


def _build_rope(vllm_config: Any, hf: Any):
    """vLLM's rotary embedding for the model, built as its attention layers build it.

    get_rope's signature changed across versions: rope_parameters (>= 0.12) replaced
    base + rope_scaling; rotary_dim and partial_rotary_factor moved into the parameters.
    The result is left out of get_rope's process-wide cache, not to pin a second
    cos/sin table (up to hundreds of MB for long-context models).
    """
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers import rotary_embedding as re_mod

    mc = vllm_config.model_config
    head_size = mc.get_head_size()
    sig = inspect.signature(re_mod.get_rope).parameters
    kwargs: dict[str, Any] = dict(
        head_size=head_size, max_position=getattr(hf, "max_position_embeddings", 8192),
        is_neox_style=True, dtype=torch.float32)
    if "rope_parameters" in sig:
        kwargs["rope_parameters"] = getattr(hf, "rope_parameters", None)
        if "rope_theta" not in (kwargs["rope_parameters"] or {}):
            raise UnsupportedRopeError("the model config has no rope_theta")
    else:
        kwargs["base"] = getattr(hf, "rope_theta", 10000)
        kwargs["rope_scaling"] = getattr(hf, "rope_scaling", None)
    if "rotary_dim" in sig:
        kwargs["rotary_dim"] = head_size
    if "partial_rotary_factor" in sig:
        kwargs["partial_rotary_factor"] = getattr(hf, "partial_rotary_factor", 1.0)

    cache = getattr(re_mod, "_ROPE_DICT", {})
    before = set(cache)
    with set_current_vllm_config(vllm_config):
        rope = re_mod.get_rope(**kwargs)
    for key in set(cache) - before:
        del cache[key]
    return rope


def _inv_freq(rope: Any, rope_type: str) -> torch.Tensor:
    """The frequencies the rope's cos/sin table was built from (exact class: MRotaryEmbedding
    and others subclass RotaryEmbedding but are not plain rotations)."""
    kind = type(rope).__name__
    if kind in ("RotaryEmbedding", "Llama3RotaryEmbedding", "NTKScalingRotaryEmbedding"):
        return rope._compute_inv_freq(rope.base)
    if kind == "LinearScalingRotaryEmbedding":
        factors = rope.scaling_factors
        factors = list(factors) if isinstance(factors, (list, tuple)) else [factors]
        if len(factors) == 1:  # its table is built at positions p / factor
            return rope._compute_inv_freq(rope.base) / factors[0]
    if kind == "YaRNScalingRotaryEmbedding":
        return rope._compute_inv_freq(rope.scaling_factor)
    raise UnsupportedRopeError(f"RoPE type {rope_type!r} ({kind}) is not supported for "
                               "position shifts")


def _check_table(rope: Any, inv_freq: torch.Tensor) -> None:
    """cos_sin_cache[p] == m * (cos(p * inv_freq), sin(p * inv_freq)) for small p."""
    half = rope.rotary_dim // 2
    table = rope.cos_sin_cache[1:CHECK_POSITIONS + 1].double().cpu()
    ang = torch.arange(1, CHECK_POSITIONS + 1, dtype=torch.float64)[:, None] * inv_freq.double()
    mag = table[0, :half].hypot(table[0, half:]).mean()
    want = torch.cat((ang.cos(), ang.sin()), dim=-1) * mag
    if not torch.allclose(table, want, atol=1e-5 * float(mag), rtol=0):
        raise UnsupportedRopeError(f"{type(rope).__name__}'s cos/sin table does not match its "
                                   "inv_freq: this vLLM version builds it differently")


def rope_params(vllm_config: Any) -> tuple[torch.Tensor, int, bool]:
    """(inv_freq float32 [rotary_dim // 2], rotary_dim, is_neox_style) of the served model.

    Raises UnsupportedRopeError (a NotImplementedError) for architectures or RoPE
    variants whose KV cannot be moved to other positions by `rope_shift_`.
    """
    mc = vllm_config.model_config
    archs = set(getattr(mc.hf_config, "architectures", None) or [])
    if not archs & SUPPORTED_ARCHITECTURES:
        raise UnsupportedRopeError("position-shifted KV reuse supports "
                                   f"{sorted(SUPPORTED_ARCHITECTURES)}, not {sorted(archs)}")
    hf = mc.hf_text_config
    params = _rope_config(hf)
    _check_shiftable(hf, params)
    rope = _build_rope(vllm_config, hf)
    inv_freq = _inv_freq(rope, params.get("rope_type", "default")).float().contiguous()
    _check_table(rope, inv_freq)
    return inv_freq, int(rope.rotary_dim), bool(rope.is_neox_style)
