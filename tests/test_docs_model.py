"""The trained docs-llama model in models/docs-llama: loads, is small, and is not random."""

from __future__ import annotations

from pathlib import Path

import pytest

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "docs-llama"
MAX_BYTES = 20 * 1024 * 1024

# Written for this test, in the style of the training documentation (not taken from it).
ENGLISH = (
    "The configuration file is read when the service starts. Each section of the file "
    "describes one server, and the options in a section apply only to that server. If "
    "an option is not set, the default value is used. To change the port that the server "
    "listens on, set the port option and restart the service. The log file records every "
    "request that the server receives, so that errors can be found later. When the disk "
    "is full, old log files are removed first. For more information, see the manual page "
    "and the examples that are installed with the package."
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def test_model_dir_is_small():
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert 0 < size < MAX_BYTES


def test_config_is_llama(model):
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert model.config.vocab_size == 8192
    assert model.config.max_position_embeddings >= 2048


def test_tokenizer_round_trips_english(tokenizer):
    ids = tokenizer(ENGLISH)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == ENGLISH
    # A real BPE merges English into far fewer tokens than bytes.
    assert len(ids) < len(ENGLISH) / 3


def _mean_loss(model, ids: list[int]) -> float:
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        return model(input_ids=x, labels=x).loss.item()


def test_english_is_likelier_than_shuffled_tokens(model, tokenizer):
    """A trained model predicts English far better than the same tokens in random order;
    to an untrained model both are equally surprising."""
    import random

    ids = tokenizer(ENGLISH)["input_ids"]
    body = ids[1:]
    random.Random(0).shuffle(body)
    real, shuffled = _mean_loss(model, ids), _mean_loss(model, ids[:1] + body)
    assert real < 6.5
    assert shuffled - real > 1.0, (real, shuffled)


def test_chat_template_renders_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Answer from the document."},
        {"role": "user", "content": "Which port is used?"},
        {"role": "assistant", "content": "Port 80."},
        {"role": "user", "content": "And the log file?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s>### System:\nAnswer from the document.\n\n"
        "### User:\nWhich port is used?\n\n"
        "### Assistant:\nPort 80.</s>\n\n"
        "### User:\nAnd the log file?\n\n"
        "### Assistant:\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids.count(tokenizer.bos_token_id) == 1
