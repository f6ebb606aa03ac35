"""Train a small Llama-architecture language model on the corpus of build_corpus.py.

Steps (each reused when its output already exists):

1. A byte-level BPE tokenizer (``tokenizers``) trained on train.txt, saved to --out.
2. train.txt tokenized into one uint16 stream, ``<s> doc </s> <s> doc </s> ...``, saved as
   ``<corpus>/train-tokens.npy`` (``--prepare-only`` stops here, so a GPU machine can train
   from the .npy, documents.jsonl and the tokenizer without the raw corpus).
3. A ``transformers.LlamaForCausalLM`` trained on random windows of that stream: AdamW,
   linear warmup then cosine decay, fp32 on CPU (bf16 autocast on CUDA).  Most steps use
   --seq-len windows; the last --long-frac of the steps use --long-seq-len windows, so
   the model also works on prompts longer than the bulk of its training.
4. Held-out loss/perplexity on documents.jsonl, and the model saved in Hugging Face
   format (bf16 safetensors, tokenizer with a chat template, model card) for vLLM.

--minutes sets a time budget: a few timed steps on a throwaway copy of the model turn it
into a step count, which the model card records.  Given --steps and --seed, training on
CPU is deterministic.

    python models/build_corpus.py --out /tmp/docs-corpus
    python models/train_docs_llama.py --corpus /tmp/docs-corpus --out models/docs-llama \\
        --minutes 12 --threads 1 --seed 0
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_corpus import load_documents, load_train_documents  # noqa: E402

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, in this order
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
SAVE_DTYPE = "bfloat16"

# Plain-text turn markers: the model has seen Markdown headings, not special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}"
    "### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=Path("/tmp/docs-corpus"),
                   help="directory with train.txt (or train-tokens.npy) and documents.jsonl")
    p.add_argument("--out", type=Path, default=Path("models/docs-llama"))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--minutes", type=float, default=12.0, help="training time budget")
    p.add_argument("--steps", type=int, default=None, help="exact step count (overrides --minutes)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch and tokenizers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prepare-only", action="store_true",
                   help="build the tokenizer and train-tokens.npy, then stop")
    p.add_argument("--retokenize", action="store_true",
                   help="retrain the tokenizer and re-tokenize even if they exist")
    # Model shape.
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--max-positions", type=int, default=4096)
    # Untied by default: at this training budget a separate output matrix leaves the
    # unigram plateau sooner (held-out loss 6.51 vs 6.70 after 150 steps of 2048 tokens).
    p.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=False)
    # Optimisation.
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: fp32 on CPU, bf16 autocast on CUDA")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--long-seq-len", type=int, default=2048)
    p.add_argument("--long-frac", type=float, default=0.15,
                   help="share of the steps (at the end) that use --long-seq-len windows")
    p.add_argument("--copy-frac", type=float, default=0.2,
                   help="share of windows in which a span of the window is repeated later "
                        "in it, to teach copying (see sample_batch)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-frac", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-len", type=int, default=2048,
                   help="held-out documents are scored on their first this many tokens")
    args = p.parse_args(argv)
    args.argv = sys.argv if argv is None else ["models/train_docs_llama.py", *argv]
    return args


# ---------------------------------------------------------------- tokenizer and tokens

def train_tokenizer(train_txt: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # encode(text) gives "<s> text", like the documents the model is trained on.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(load_train_documents(train_txt), trainer=trainer)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(4))
    return tokenizer


def tokenize_corpus(tokenizer, train_txt: Path) -> np.ndarray:
    docs = load_train_documents(train_txt)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(docs):  # each starts with <s>
        ids.extend(encoding.ids)
        ids.append(EOS_ID)
    assert max(ids) < 2**16
    return np.asarray(ids, dtype=np.uint16)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(args) -> tuple[object, Path]:
    """The tokenizer (in --out) and the tokenized corpus (in --corpus), built if missing."""
    from tokenizers import Tokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer_path = args.out / "tokenizer.json"
    tokens_path = args.corpus / "train-tokens.npy"
    meta_path = args.corpus / "train-tokens.json"
    train_txt = args.corpus / "train.txt"

    if tokenizer_path.exists() and not args.retokenize:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        if tokenizer.get_vocab_size() != args.vocab_size:
            sys.exit(f"{tokenizer_path} has vocab {tokenizer.get_vocab_size()}, "
                     f"not --vocab-size {args.vocab_size}; pass --retokenize")
    else:
        t0 = time.time()
        tokenizer = train_tokenizer(train_txt, args.vocab_size)
        tokenizer.save(str(tokenizer_path))
        print(f"tokenizer: vocab {tokenizer.get_vocab_size()} trained in "
              f"{time.time() - t0:.0f}s -> {tokenizer_path}", flush=True)

    # The .npy is only valid for the tokenizer that made it.
    tokenizer_hash = file_sha256(tokenizer_path)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if args.retokenize or meta.get("tokenizer_sha256") != tokenizer_hash or not tokens_path.exists():
        t0 = time.time()
        tokens = tokenize_corpus(tokenizer, train_txt)
        np.save(tokens_path, tokens)
        meta_path.write_text(json.dumps({"tokenizer_sha256": tokenizer_hash,
                                         "tokens": int(tokens.size),
                                         "train_txt_bytes": train_txt.stat().st_size}))
        print(f"tokens: {tokens.size:,} in {time.time() - t0:.0f}s -> {tokens_path}", flush=True)
    return tokenizer, tokens_path


# ---------------------------------------------------------------- model and data

def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden,
        intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=args.tie_embeddings,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def sample_batch(rng: np.random.Generator, tokens: np.ndarray, batch: int, seq_len: int,
                 copy_frac: float) -> np.ndarray:
    """`batch` random windows of seq_len + 1 tokens (inputs and shifted labels).

    In a `copy_frac` share of the windows a span of 32 to seq_len/4 tokens is written
    again further on in the same window.  Doc-QA answers quote their document; at this
    model's training budget natural repeats are too rare for it to learn to copy from
    context (induction), and explicit repeats teach it within a few hundred steps.
    """
    starts = rng.integers(0, tokens.size - seq_len - 1, size=batch)
    windows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    copy_rows = rng.random(batch) < copy_frac
    max_span = max(32, seq_len // 4)
    for row in np.flatnonzero(copy_rows):
        span = int(rng.integers(32, max_span + 1))
        src = int(rng.integers(0, seq_len + 1 - 2 * span + 1))
        dst = int(rng.integers(src + span, seq_len + 1 - span + 1))
        windows[row, dst:dst + span] = windows[row, src:src + span]
    return windows


def to_device(windows: np.ndarray, device):
    import torch

    batch = torch.from_numpy(windows)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


def lr_at(step: int, total: int, args) -> float:
    warmup = max(1, int(args.warmup_frac * total))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def make_optimizer(model, args):
    import torch

    # No weight decay on norms (1-D); the tied embedding matrix is decayed like the rest.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def train_step(model, optimizer, inputs, labels, lr: float, args, autocast) -> float:
    import torch

    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast():
        logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def phases(args) -> list[tuple[int, int]]:
    """(seq_len, batch) of the main and the long phase; tokens per step are equal."""
    long_batch = max(1, args.batch_size * args.seq_len // args.long_seq_len)
    return [(args.seq_len, args.batch_size), (args.long_seq_len, long_batch)]


def steps_for_budget(model, args, device, autocast) -> int:
    """How many steps fit in --minutes, timed on a throwaway copy of the model."""
    import torch

    scratch = copy.deepcopy(model)
    optimizer = make_optimizer(scratch, args)
    rng = np.random.default_rng(12345)  # not the training stream
    seconds = []
    for seq_len, batch in phases(args):
        fake = rng.integers(0, args.vocab_size, size=(batch, seq_len + 1))
        inputs, labels = to_device(fake, device)
        train_step(scratch, optimizer, inputs, labels, 0.0, args, autocast)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            train_step(scratch, optimizer, inputs, labels, 0.0, args, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append((time.perf_counter() - t0) / 3)
    per_step = (1 - args.long_frac) * seconds[0] + args.long_frac * seconds[1]
    steps = max(10, int(args.minutes * 60 / per_step))
    print(f"calibration: {seconds[0]:.3f}s/step at {phases(args)[0]}, "
          f"{seconds[1]:.3f}s/step at {phases(args)[1]} -> {steps} steps "
          f"for {args.minutes:g} min", flush=True)
    return steps


# ---------------------------------------------------------------- evaluation

def heldout_losses(model, tokenizer, documents: list[dict], device, eval_len: int,
                   short_len: int) -> dict:
    """Mean next-token loss on held-out documents: at positions < short_len, and all."""
    import torch

    model.eval()
    sums = {"short": 0.0, "all": 0.0}
    counts = {"short": 0, "all": 0}
    with torch.no_grad():
        for doc in documents:
            ids = tokenizer.encode(doc["text"]).ids[:eval_len]
            x = torch.tensor([ids], device=device)
            logits = model(input_ids=x[:, :-1]).logits.float()
            losses = torch.nn.functional.cross_entropy(
                logits[0], x[0, 1:], reduction="none")
            sums["all"] += losses.sum().item()
            counts["all"] += losses.numel()
            sums["short"] += losses[:short_len].sum().item()
            counts["short"] += min(short_len, losses.numel())
    model.train()
    return {f"heldout_loss_{k}": sums[k] / counts[k] for k in sums} | {
        "heldout_tokens": counts["all"]}


def copy_losses(model, tokenizer, documents: list[dict], device, span: int = 128) -> dict:
    """Loss on a held-out passage the first time it is read and when it is repeated.

    A model that copies from its context predicts the repeat far better than the
    original; a model without induction does not.
    """
    import torch

    model.eval()
    first, second = [], []
    with torch.no_grad():
        for doc in documents:
            ids = tokenizer.encode(doc["text"]).ids[1:span + 1]
            x = torch.tensor([[BOS_ID] + ids + ids], device=device)
            logits = model(input_ids=x[:, :-1]).logits.float()
            losses = torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="none")
            first.append(losses[:span].mean().item())
            second.append(losses[span:].mean().item())
    model.train()
    return {"copy_loss_first": float(np.mean(first)), "copy_loss_repeat": float(np.mean(second))}


# ---------------------------------------------------------------- saving

def save_model(model, args, report: dict) -> None:
    """Everything but tokenizer.json (written by prepare) into --out."""
    import torch
    from transformers import GenerationConfig

    out = args.out
    model = copy.deepcopy(model).to("cpu", dtype=getattr(torch, SAVE_DTYPE))
    model.save_pretrained(out, safe_serialization=True)
    config = json.loads((out / "config.json").read_text())
    # Older readers look for these keys rather than "dtype" / "rope_parameters".
    config["torch_dtype"] = SAVE_DTYPE
    config["rope_theta"] = 10000.0
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
                     ).save_pretrained(out)
    # Written by hand so the chat template stays inside tokenizer_config.json.
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "model_max_length": args.max_positions,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
    }, indent=2) + "\n")
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(model_card(args, report))


def model_card(args, r: dict) -> str:
    command = ("python models/build_corpus.py --out /tmp/docs-corpus\n"
               + shlex.join(r["reproduce_argv"]))
    # An induction-capable model predicts a repeated passage far better than its first
    # reading; a small gap means it has not learned to copy from its context yet.
    copy_gain = r["copy_loss_first"] - r["copy_loss_repeat"]
    if copy_gain > 1.0:
        copying = (f"It copies from its context: a repeated passage costs {copy_gain:.2f} "
                   "nats/token less than its first reading.")
    else:
        copying = (f"It has not learned to copy from its context at this training budget "
                   f"(a repeated passage is only {copy_gain:.2f} nats/token cheaper than its "
                   "first reading); a longer run, on a GPU say, is needed for that.")
    long_batch = phases(args)[1][1]
    embeddings = "tied" if args.tie_embeddings else "untied"

    def row(name: str, loss: float) -> str:
        return f"| {name} | {loss:.3f} | {math.exp(loss):.1f} |"

    return f"""# docs-llama

A small Llama-architecture causal language model ({r['params'] / 1e6:.2f}M parameters), trained
from scratch on English technical documentation that ships with this machine, so that
prompt-module KV reuse can be measured on a real (non-random) model.  {copying}

## Data

Built by `models/build_corpus.py` (nothing downloaded): Python's pydoc topics, standard
library docstrings (parsed with `ast`), `/usr/share/doc` READMEs, NEWS files and manuals,
and documentation in site-packages (Markdown/RST/text files, package long descriptions);
cleaned, filtered for prose, deduplicated by paragraph.

- train.txt: {r['corpus_documents']:,} documents, {r['corpus_tokens']:,} tokens.
- documents.jsonl: {r['heldout_documents']} held-out documents of 300-3000 words, held out by
  source file; none of their paragraphs is in train.txt.

## Model

`LlamaForCausalLM`, weights in {SAVE_DTYPE}: vocab {args.vocab_size} (byte-level BPE; `<unk>`,
`<s>`, `</s>`, `<pad>` are ids 0-3), hidden {args.hidden}, {args.layers} layers, {args.heads} heads,
{args.kv_heads} KV heads, MLP {args.intermediate}, {embeddings} input/output embeddings, RoPE theta
10000, {args.max_positions} positions.  The tokenizer prepends `<s>`; the chat template uses
plain `### System:`, `### User:` and `### Assistant:` markers.

## Training

- {r['steps']} steps of {r['tokens_per_step']:,} tokens: {r['tokens_seen']:,} tokens seen
  ({r['tokens_seen'] / r['corpus_tokens']:.2f} epochs) in {r['train_minutes']:.1f} minutes on
  {r['device_name']}, {args.threads} thread(s), {r['precision']}, seed {args.seed}.
- Windows of {args.seq_len} tokens (batch {args.batch_size}); the last {r['long_steps']} steps use
  windows of {args.long_seq_len} tokens (batch {long_batch}), for prompts longer than {args.seq_len}.
- In {args.copy_frac:.0%} of the windows a span of the window is repeated later in it, to
  encourage copying from context.
- AdamW (betas 0.9, 0.95; weight decay {args.weight_decay}), peak LR {args.lr:g} after
  {args.warmup_frac:.0%} linear warmup, cosine decay to {args.min_lr_ratio:g} x peak,
  gradient clipping at {args.grad_clip:g}.

## Results

| | loss (nats/token) | perplexity |
|---|---|---|
{row(f"training, mean of the last {r['final_train_window']} steps", r['final_train_loss'])}
{row(f"held-out documents, first {args.seq_len} tokens", r['heldout_loss_short'])}
{row(f"held-out documents, first {args.eval_len} tokens", r['heldout_loss_all'])}
{row("held-out 128-token passage, first reading", r['copy_loss_first'])}
{row("the same passage repeated right after it", r['copy_loss_repeat'])}

## Reproduce

```
{command}
```

The run was started as `{shlex.join(r['argv'])}`; on CPU the fixed step count
reproduces it exactly.
"""


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Set before tokenizers and torch start their thread pools.
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    tokenizer, tokens_path = prepare(args)
    if args.prepare_only:
        return

    device = torch.device(args.device)
    tokens = np.load(tokens_path, mmap_mode="r")
    documents = load_documents(args.corpus / "documents.jsonl")
    model = build_model(args).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters, {tokens.size:,} training tokens", flush=True)

    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    steps = args.steps or steps_for_budget(model, args, device, autocast)
    long_steps = int(round(args.long_frac * steps))
    optimizer = make_optimizer(model, args)
    rng = np.random.default_rng(args.seed)
    losses: list[float] = []
    tokens_seen = 0
    t_start = time.perf_counter()
    t_log = t_start
    for step in range(steps):
        seq_len, batch = phases(args)[1 if step >= steps - long_steps else 0]
        windows = sample_batch(rng, tokens, batch, seq_len, args.copy_frac)
        inputs, labels = to_device(windows, device)
        losses.append(train_step(model, optimizer, inputs, labels,
                                 lr_at(step, steps, args), args, autocast))
        tokens_seen += batch * seq_len
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            now = time.perf_counter()
            recent = losses[-args.log_every:]
            print(f"step {step + 1}/{steps} seq {seq_len} lr {lr_at(step, steps, args):.2e} "
                  f"loss {np.mean(recent):.3f} {len(recent) * batch * seq_len / (now - t_log):,.0f} tok/s "
                  f"{(now - t_start) / 60:.1f} min", flush=True)
            t_log = now
    train_minutes = (time.perf_counter() - t_start) / 60

    final_window = max(1, min(50, steps // 10))
    report = {
        "argv": args.argv,
        "reproduce_argv": reproduce_argv(args, steps),
        "params": params,
        "corpus_documents": int(np.count_nonzero(np.asarray(tokens) == BOS_ID)),
        "corpus_tokens": int(tokens.size),
        "heldout_documents": len(documents),
        "steps": steps,
        "long_steps": long_steps,
        "tokens_per_step": args.batch_size * args.seq_len,
        "tokens_seen": tokens_seen,
        "train_minutes": train_minutes,
        "device_name": (torch.cuda.get_device_name() if device.type == "cuda"
                        else f"CPU (torch {torch.__version__})"),
        "precision": "bf16 autocast" if bf16 else "fp32",
        "final_train_window": final_window,
        "final_train_loss": float(np.mean(losses[-final_window:])),
    }
    report |= heldout_losses(model, tokenizer, documents, device, args.eval_len, args.seq_len)
    report |= copy_losses(model, tokenizer, documents, device)
    for key in ("final_train_loss", "heldout_loss_short", "heldout_loss_all",
                "copy_loss_first", "copy_loss_repeat"):
        print(f"{key}: {report[key]:.3f} (perplexity {math.exp(report[key]):.1f})")
    save_model(model, args, report)
    print(f"saved to {args.out}")


def reproduce_argv(args, steps: int) -> list[str]:
    """The command line of this run with --steps fixed and --minutes dropped."""
    argv, skip = [], False
    for arg in args.argv:
        if skip:
            skip = False
            continue
        if arg in ("--minutes", "--steps"):
            skip = True
            continue
        if arg.startswith(("--minutes=", "--steps=")):
            continue
        argv.append(arg)
    return ["python", *argv, "--steps", str(steps)]


if __name__ == "__main__":
    main()
