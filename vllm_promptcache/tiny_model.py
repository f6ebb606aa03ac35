"""Build the small Llama-architecture models the demo, tests and benchmarks run on.

Nothing can be downloaded, so a model is made here: a BPE tokenizer trained with
`tokenizers` on English text that ships with Python (the standard library's
docstrings), and a Llama config.  The ``tiny`` model gets seeded random weights
(safetensors); the ``bench`` shape (a 0.5B Qwen2-0.5B-like Llama config) ships no
weights and is meant for ``load_format="dummy"``.

Models are built once into a cache directory and reused; the build is atomic
(temporary directory, then rename), so concurrent test workers never see half a
model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Bump when the recipe changes, so stale caches are rebuilt rather than reused.
RECIPE_VERSION = 3

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@dataclass(frozen=True)
class ModelShape:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    with_weights: bool


SHAPES = {
    # 2 layers, GQA (4 query heads over 2 KV heads), head size 32: the smallest
    # shape vLLM's CPU attention accepts, so an engine starts in seconds.
    "tiny": ModelShape("tiny", 2048, 128, 256, 2, 4, 2, 4096, True),
    # The benchmark shape from the design: 24 layers, hidden 896, 14 heads,
    # 2 KV heads (head size 64), as Qwen2-0.5B.
    "bench": ModelShape("bench", 8192, 896, 4864, 24, 14, 2, 8192, False),
}


def default_cache_dir() -> Path:
    root = os.environ.get("PROMPTCACHE_MODEL_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-promptcache" / "models"


def _corpus() -> list[str]:
    """English text that ships with every Python: the standard library's docstrings."""
    import importlib
    import inspect

    names = [
        "argparse", "asyncio", "collections", "csv", "dataclasses", "datetime", "email",
        "functools", "http.client", "inspect", "json", "logging", "os", "pathlib",
        "pickle", "random", "re", "shutil", "socket", "sqlite3", "string", "subprocess",
        "tarfile", "threading", "typing", "unittest", "urllib.request", "zipfile",
    ]
    texts = []
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if doc:
                texts.append(doc)
        if mod.__doc__:
            texts.append(mod.__doc__)
    return texts


def _train_tokenizer(vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def _config(shape: ModelShape) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def _write_weights(shape: ModelShape, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    head = h // shape.num_heads
    kv = shape.num_kv_heads * head

    def rnd(*s, std=0.08):
        return (torch.randn(*s, generator=gen) * std).to(torch.bfloat16).contiguous()

    def ones():
        return torch.ones(h, dtype=torch.bfloat16)

    # A wide output head makes logits peaked (logit std ~ 7): greedy decoding is
    # then far from ties, so equal outputs with and without the cache mean equal
    # computation, not luck, and bf16 rounding noise cannot flip a token.
    t = {"model.embed_tokens.weight": rnd(v, h, std=1.0), "model.norm.weight": ones(),
         "lm_head.weight": rnd(v, h, std=0.6)}
    for layer in range(shape.num_layers):
        p = f"model.layers.{layer}."
        t.update({
            p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
            p + "mlp.down_proj.weight": rnd(h, i),
            p + "input_layernorm.weight": ones(),
            p + "post_attention_layernorm.weight": ones(),
        })
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})


def build_model(name: str = "tiny", cache_dir: str | os.PathLike | None = None) -> str:
    """Return the path of the named model, building it first if needed.  "smollm2" is
    the real SmolLM2-135M-Instruct, converted from an installed package (real_model.py)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    if name == "smollm2":
        from .real_model import build_smollm2

        return build_smollm2(root)
    if name not in SHAPES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted([*SHAPES, 'smollm2'])}")
    shape = SHAPES[name]

    def write(tmp: Path) -> dict:
        _train_tokenizer(shape.vocab_size, tmp)
        if shape.with_weights:
            _write_weights(shape, tmp)
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        return _config(shape)

    return publish_model_dir(root, root / f"{name}-llama-v{RECIPE_VERSION}", write)


def publish_model_dir(root: Path, final: Path, write: Callable[[Path], dict]) -> str:
    """The model directory `final`, built once and atomically: `write(tmp)` fills a
    temporary directory beside it and returns config.json's content, written last (its
    presence marks a complete model); a rename publishes it, and a concurrent builder
    that won the race is kept."""
    if (final / "config.json").exists():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        config = write(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


if __name__ == "__main__":
    import sys

    for n in sys.argv[1:] or ["tiny"]:
        print(build_model(n))
