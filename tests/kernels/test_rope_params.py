"""rope_params: the served model's RoPE frequencies from real vLLM configs of the tiny
Llama (with Llama-3, linear+partial and YaRN scaling), against vLLM's own rotary
embedding and against independent formulas; clear errors for what cannot be shifted."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from vllm_promptcache.kernels.rope_params import UnsupportedRopeError, rope_params

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
CONFIGS = {  # id: config.json overrides (the tiny model: head size 32)
    "llama3": dict(rope_theta=500000.0, max_position_embeddings=131072, rope_scaling=LLAMA3),
    "linear-partial": dict(rope_theta=10000.0, partial_rotary_factor=0.5,
                           rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "yarn": dict(rope_theta=10000.0, max_position_embeddings=16384,
                 rope_scaling={"rope_type": "yarn", "factor": 4.0,
                               "original_max_position_embeddings": 4096}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


def vllm_config_for(tmp_path_factory, name):
    from vllm.config import ModelConfig, VllmConfig

    from vllm_promptcache.tiny_model import build_model

    src = build_model("tiny")
    out = tmp_path_factory.mktemp(name)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json"):
        shutil.copy(f"{src}/{f}", out / f)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(CONFIGS[name])
    (out / "config.json").write_text(json.dumps(cfg))
    return VllmConfig(model_config=ModelConfig(model=str(out), skip_tokenizer_init=True))


@pytest.fixture(scope="module", params=["llama3", "linear-partial", "yarn"])
def served(request, tmp_path_factory):
    """(name, vllm_config, vLLM's rotary embedding for it, built as llama.py builds it)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    vc = vllm_config_for(tmp_path_factory, request.param)
    hf = vc.model_config.hf_text_config
    with set_current_vllm_config(vc):
        rope = get_rope(vc.model_config.get_head_size(), hf.max_position_embeddings, True,
                        hf.rope_parameters, torch.float32)
    return request.param, vc, rope


def independent_inv_freq(name: str) -> torch.Tensor:
    """float64 formulas from the papers / HF, not from vLLM."""
    base = CONFIGS[name].get("rope_theta", 10000.0)
    rot = int(32 * CONFIGS[name].get("partial_rotary_factor", 1.0))
    inv = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    if name == "llama3":
        lo, hi = 8192 / LLAMA3["low_freq_factor"], 8192 / LLAMA3["high_freq_factor"]
        wave = 2 * math.pi / inv
        smooth = (8192 / wave - 1.0) / (4.0 - 1.0)
        mid = (1 - smooth) * inv / 8.0 + smooth * inv
        inv = torch.where(wave < hi, inv, torch.where(wave > lo, inv / 8.0, mid))
    elif name == "linear-partial":
        inv = inv / 4.0
    return inv


def test_matches_vllm_rotary_embedding(served):
    from vllm.model_executor.layers import rotary_embedding

    name, vc, rope = served
    cached = len(rotary_embedding._ROPE_DICT)
    inv_freq, rot, neox = rope_params(vc)
    assert len(rotary_embedding._ROPE_DICT) == cached, "left a cos/sin table in get_rope's cache"
    assert neox is True and inv_freq.dtype == torch.float32
    assert rot == rope.rotary_dim == (16 if name == "linear-partial" else 32)
    if name == "yarn":
        want = rope._compute_inv_freq(rope.scaling_factor)
    else:
        want = rope._compute_inv_freq(rope.base)
        if name == "linear-partial":
            want = want / 4.0
        torch.testing.assert_close(inv_freq.double(), independent_inv_freq(name),
                                   rtol=1e-6, atol=0)
    assert torch.equal(inv_freq, want.float())
    if name == "llama3":
        plain = 1.0 / 500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
        assert (inv_freq.double() < plain * 0.5).any(), "llama3 scaling must be applied"


def test_shift_reproduces_vllm_rope_at_new_positions(served):
    """K rotated by vLLM's own forward at positions q, shifted by d with rope_params'
    frequencies == vLLM's forward at q + d (negative d included)."""
    from vllm_promptcache.kernels.rope_shift import rope_shift_reference

    name, vc, rope = served
    inv_freq, rot, neox = rope_params(vc)
    n, H, D = 24, 2, rope.head_size
    k = torch.randn(n, H * D)
    pos = torch.arange(1000, 1000 + n)
    for d in (-977, 0, 313):
        at_q = rope.forward_native(pos, torch.zeros_like(k), k.clone())[1].view(n, H, D)
        at_qd = rope.forward_native(pos + d, torch.zeros_like(k), k.clone())[1].view(n, H, D)
        dst = torch.full((2, H, 16, 2 * D), float("nan"))
        dst_k, dst_v = dst.transpose(1, 2).split(D, dim=-1)
        rope_shift_reference(at_q, at_q, dst_k, dst_v, torch.arange(n), torch.full((n,), d),
                             inv_freq, rot, neox)
        got = dst_k.reshape(32, H, D)[:n]
        err = (got - at_qd).abs().max() / at_qd.abs().max()
        assert float(err) < 2e-4, f"[{name} d={d}] {float(err):.3g}"


def test_unsupported_rope_type_is_a_clear_error(tmp_path_factory):
    vc = vllm_config_for(tmp_path_factory, "dynamic")
    with pytest.raises(UnsupportedRopeError, match="dynamic"):
        rope_params(vc)


def stand_in(architectures=("LlamaForCausalLM",), **hf_text):
    """Enough of a VllmConfig for the checks made before vLLM's rope is built."""
    hf = SimpleNamespace(architectures=list(architectures))
    return SimpleNamespace(model_config=SimpleNamespace(
        hf_config=hf, hf_text_config=SimpleNamespace(**hf_text)))


@pytest.mark.parametrize("config, match", [
    (stand_in(["GPTJForCausalLM"]), "supports"),
    (stand_in(rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                               "mrope_section": [16, 24, 24]}), "mrope"),
    (stand_in(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}), "mrope"),
    (stand_in(rope_parameters={"rope_theta": 1e6}, dual_chunk_attention_config={"chunk_size": 8}),
     "dual-chunk"),
    (stand_in(rope_parameters={"full_attention": {"rope_theta": 1e6},
                               "sliding_attention": {"rope_theta": 1e4}}), "per-layer"),
], ids=["architecture", "mrope", "mrope-legacy", "dual-chunk", "per-layer"])
def test_rejected_before_building(config, match):
    with pytest.raises(UnsupportedRopeError, match=match):
        rope_params(config)
