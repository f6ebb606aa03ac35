"""Real LoRA adapters (PEFT layout) for the tiny model, written by the tests."""

from __future__ import annotations

import json
import os


def write_lora_adapter(path: str, model_dir: str, seed: int, rank: int = 8,
                       scale: float = 0.5) -> str:
    """A LoRA adapter on every layer's q_proj and v_proj, strong enough to change
    the greedy tokens; returns `path`."""
    import torch
    from safetensors.torch import save_file

    config = json.load(open(os.path.join(model_dir, "config.json")))
    hidden = config["hidden_size"]
    head = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
                   "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
                   "target_modules": ["q_proj", "v_proj"],
                   "base_model_name_or_path": model_dir}, f)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for proj, out in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, hidden, generator=g)
                                                  * scale).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out, rank, generator=g)
                                                  * scale).contiguous()
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    return path
