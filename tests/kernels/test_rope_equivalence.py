"""The equivalence check: the KV of a token span prefilled at offset 0, then shifted by p
with rope_shift, equals the KV of the same span prefilled at offset p -- to fp32 rounding
(relative error below 1e-5), for every layer, on the tiny model and on a GQA config with
Llama-3 scaling.

The offset-0 prefill is the transformers LlamaForCausalLM in float32, as served.  The
offset-p prefill ("truth") is the same model in float64 with float64 RoPE angles: stock
transformers computes ``position * inv_freq`` in float32 whatever the model dtype, which at
p > 32k misplaces the angle by up to half an ulp of p (~2e-3 rad at p = 40k), i.e. a ~1e-3
relative error in K.  That is the reference's error, not the shift's (the kernel reduces
float64 angles), so the stock float32 offset-p KV is only logged for comparison.

The span starts the sequence in both prefills, so every layer sees the same relative
positions: hidden states, pre-RoPE K and V of all layers agree, and the cached
(post-RoPE) K at offset p is the offset-0 K rotated by p.
"""

import copy

import pytest
import torch

from vllm_promptcache.kernels.rope_shift import (
    HAS_TRITON, rope_shift_, rope_shift_reference)


# Run the Triton kernels interpreted (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("triton_interpreter")


RTOL = 1e-5
IMPLS = {"triton": rope_shift_, "reference": rope_shift_reference}
SPAN = 20        # tokens per prefill
BLOCK_SIZE = 16  # paged destination: the span crosses block boundaries
NUM_BLOCKS = 6

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# ---------------------------------------------------------------------------- models

def tiny_model():
    from transformers import LlamaForCausalLM

    from vllm_promptcache.tiny_model import build_model

    return LlamaForCausalLM.from_pretrained(build_model("tiny"), dtype=torch.float32,
                                            attn_implementation="eager").eval()


def llama3_gqa_model():
    """Random weights (from the test's seed), 8 query heads over 2 KV heads, head 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_parameters=dict(LLAMA3), attn_implementation="eager")
    return LlamaForCausalLM(cfg).float().eval()


class ExactRotary(torch.nn.Module):
    """transformers' LlamaRotaryEmbedding with float64 angles (same inv_freq table)."""

    def __init__(self, rotary):
        super().__init__()
        self.register_buffer("inv_freq", rotary.inv_freq.double().clone(), persistent=False)
        self.attention_scaling = rotary.attention_scaling

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].double() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * self.attention_scaling).to(x.dtype),
                (emb.sin() * self.attention_scaling).to(x.dtype))


def exact_reference(model):
    ref = copy.deepcopy(model).double()
    ref.model.rotary_emb = ExactRotary(model.model.rotary_emb)
    return ref


@torch.no_grad()
def prefill_kv(model, ids: torch.Tensor, offset: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V) as cached, [tokens, kv_heads, head_dim], for `ids` at positions
    offset.. with nothing before them."""
    pos = torch.arange(offset, offset + ids.numel())[None]
    out = model(input_ids=ids[None], position_ids=pos, use_cache=True)
    return [(layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1))
            for layer in out.past_key_values.layers]


def vllm_inv_freq(name: str, head_dim: int, max_pos: int, params: dict) -> torch.Tensor:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(head_dim, max_pos, True, params, torch.float32)
    assert rope.is_neox_style and rope.rotary_dim == head_dim, name
    return rope._compute_inv_freq(rope.base).float()


# ----------------------------------------------------------------------------- check

def shifted_kv(impl, k0, v0, p, inv_freq):
    """k0/v0 written through a shuffled block table (non-aligned start) into NaN-poisoned
    4-D paged caches [blocks, block_size, kv_heads, head_dim], K rotated by p; read back."""
    T, H, D = k0.shape
    dst_k = torch.full((NUM_BLOCKS, BLOCK_SIZE, H, D), float("nan"))
    dst_v = torch.full_like(dst_k, float("nan"))
    start = int(torch.randint(1, BLOCK_SIZE, ()))
    pos = torch.arange(start, start + T)
    table = torch.randperm(NUM_BLOCKS)
    slots = table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    IMPLS[impl](k0, v0, dst_k, dst_v, slots, torch.full((T,), p, dtype=torch.int64),
                inv_freq, D, True)
    blk, off = slots // BLOCK_SIZE, slots % BLOCK_SIZE
    assert int((~dst_k.isnan()).sum()) == int((~dst_v.isnan()).sum()) == T * H * D
    return dst_k[blk, off], dst_v[blk, off]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max of the norm-wise and the max-abs-normalised elementwise relative error."""
    got, want = got.double(), want.double()
    norm = float((got - want).norm() / want.norm())
    elem = float((got - want).abs().max() / want.abs().max())
    return max(norm, elem)


# id: (model builder, vLLM get_rope args, offsets p as (lo, hi) random ranges or ints)
CASES = {
    "tiny": (tiny_model, (32, 4096, {"rope_type": "default", "rope_theta": 10000.0}),
             [1, (100, 4000), (32_769, 200_000)]),
    "gqa-llama3": (llama3_gqa_model, (64, 131072, LLAMA3),
                   [(1, 8192), (8192, 32_768), (32_769, 131_072), (131_072, 1_000_000)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shift_equals_prefill_at_offset(case, seed):
    assert HAS_TRITON, "the Triton path must run (interpreted), not fall back to the reference"
    build, rope_args, offsets = CASES[case]
    model = build()
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA in both cases
    inv_freq = model.model.rotary_emb.inv_freq.float()
    assert torch.equal(inv_freq, vllm_inv_freq(case, *rope_args)), "transformers != vLLM inv_freq"
    if case == "gqa-llama3":
        head_dim = cfg.head_dim
        plain = 1.0 / LLAMA3["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
        assert (inv_freq < plain * 0.5).any() and (inv_freq == plain).any()  # scaling is on
    ref = exact_reference(model)

    ids = torch.randint(10, cfg.vocab_size, (SPAN,))
    kv0 = prefill_kv(model, ids, 0)
    # The float64 reference is the served model where float32 angles are accurate.
    for layer, ((k0, v0), (k0_ref, v0_ref)) in enumerate(zip(kv0, prefill_kv(ref, ids, 0))):
        ek, ev = rel_err(k0, k0_ref), rel_err(v0, v0_ref)
        assert ek < RTOL and ev < RTOL, f"[{case} p=0 layer={layer} seed={seed}] {ek:.3g} {ev:.3g}"
    report = []
    worst = 0.0
    for spec in offsets:
        p = spec if isinstance(spec, int) else int(torch.randint(*spec, ()))
        kvp = prefill_kv(ref, ids, p)
        kvp32 = prefill_kv(model, ids, p)  # stock float32 transformers, for the log only
        for layer, ((k0, v0), (kp, vp), (kp32, _)) in enumerate(zip(kv0, kvp, kvp32)):
            k0c, v0c = k0.contiguous(), v0.contiguous()
            for impl in IMPLS:
                got_k, got_v = shifted_kv(impl, k0c, v0c, p, inv_freq)
                assert torch.equal(got_v, v0c)  # V is copied bit-for-bit
                ek, ev = rel_err(got_k, kp), rel_err(got_v, vp)
                worst = max(worst, ek, ev)
                msg = (f"[{case} p={p} layer={layer} {impl} seed={seed}] "
                       f"K rel err {ek:.3g}, V rel err {ev:.3g}")
                report.append(msg)
                assert ek < RTOL and ev < RTOL, msg
            report.append(f"[{case} p={p} layer={layer}] stock fp32 transformers K at p: "
                          f"rel err {rel_err(kp32, kp):.3g}")
    print("\n".join(report))
    print(f"[{case}] worst shifted-KV relative error {worst:.3g}")
