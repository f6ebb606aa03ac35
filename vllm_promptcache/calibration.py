"""A per-model correctness gate for position-independent reuse: `vllm-promptcache calibrate`.

A prompt module's KV was computed without the modules placed before it in a new
prompt (Prompt Cache), so shifted reuse changes answers by an amount that depends on
the model.  The boundary fix (`recompute_ratio`: the last share of the loaded run is
prefilled instead) tempers it at a cost in TTFT.  Which ratio is safe cannot be
guessed; it is measured here, once per model:

    vllm-promptcache calibrate MODEL [--prompts FILE] [--bound 0.02]

runs the fact-QA set (fact_qa.py: invented facts, documents in shuffled order) or
the user's own prompts through a full prefill and through shifted reuse at each
recompute ratio, on one engine, and reports per ratio the share of greedy answers
equal to the full prefill's ("agreement") and the token F1 against the gold answers
(against the full prefill's answers where a prompts file gives none).  It
recommends the smallest ratio whose F1 and exact match are both within `--bound` of
the full prefill's (CacheBlend's bound: 0.02 F1; see `recommend` for why exact match
too) and writes it to a record named after the model's
weights and dtype, in ``$XDG_CACHE_HOME/vllm-promptcache/calibration/`` (default
``~/.cache/...``).

At start-up a position-independent engine reads that record (`startup_check`, one
call from the connector's scheduler):

- no record: a warning naming the command above;
- a record where no ratio met the bound: the engine refuses to start, unless the
  ``calibration`` option is ``warn`` (log and go on) or ``off`` (no check);
- a record with a recommendation: when ``recompute_ratio`` was left at its default
  (0), the engine uses the recommended ratio; a ratio set explicitly (config, flag,
  environment) is kept, and a request's own ``promptcache_recompute_ratio`` still
  wins.  ``calibration: off`` leaves the configured ratio alone.

A prompts file is JSON lines, one prompt each:
``{"documents": ["...", "..."], "question": "...", "answer": "..."}`` (answer optional).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import fact_qa

logger = logging.getLogger("vllm.promptcache")

DEFAULT_BOUND = 0.02  # CacheBlend: F1 within 0.02 of a full prefill
DEFAULT_RATIOS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
RECORD_VERSION = 1


@dataclass(frozen=True)
class Example:
    docs: tuple[str, ...]   # in the order the prompt holds them
    question: str
    answer: str | None      # None: scored against the full prefill's answer


def fact_qa_examples(num_docs: int = 10, per_prompt: int = 4, seed: int = 0) -> list[Example]:
    """Every question of the seeded fact-QA set, with `per_prompt` documents (its own
    among them) in a shuffled order."""
    facts = fact_qa.fact_set(num_docs, seed)
    rng = random.Random(seed)
    examples = []
    for q in facts.questions:
        order = fact_qa.context_for(facts, q, per_prompt, rng)
        rng.shuffle(order)
        examples.append(Example(tuple(facts.docs[i] for i in order), q.text, q.answer))
    return examples


def read_prompts_file(path: str | os.PathLike) -> list[Example]:
    examples = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                docs = item["documents"]
                question = item["question"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with \"documents\" (a list "
                                 f"of strings) and \"question\": {e}") from None
            if (not isinstance(docs, list) or not docs or not all(isinstance(d, str) and d.strip()
                                                                  for d in docs)):
                raise ValueError(f"{path}:{n}: \"documents\" must be a non-empty list of strings")
            answer = item.get("answer")
            examples.append(Example(tuple(docs), str(question),
                                    None if answer is None else str(answer)))
    if not examples:
        raise ValueError(f"{path}: no prompts")
    return examples


def chat_parts(tokenizer: Any, docs: Sequence[str], question: str,
               instructions: str = fact_qa.INSTRUCTIONS) -> tuple[str, list[str], str]:
    """(head, documents, tail): the model's chat prompt (system: instructions; user: the
    documents, then the question), cut around the documents, each of which ends in a
    blank line.  The head loses the tokenizer's BOS text, which composing adds back."""
    marker = "\x00documents\x00"
    user = f"{marker}Question: {question}"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": instructions}, {"role": "user", "content": user}],
            tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates without a system role raise their own errors
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{instructions}\n\n{user}"}],
            tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        text = text[len(bos):]
    head, tail = text.split(marker)
    return head, [d.rstrip() + "\n\n" for d in docs], tail


class Prompts:
    """The examples' documents and chat heads registered as prompt modules, and each
    example's prompt composed of them: head, documents, then the question as text."""

    def __init__(self, llm: Any, examples: Sequence[Example]):
        from .modules import PromptModules, Text

        self.modules = PromptModules(llm)
        tokenizer = llm.get_tokenizer()
        names: dict[str, str] = {}
        texts: dict[str, str] = {}
        self.items = []
        for ex in examples:
            head, docs, tail = chat_parts(tokenizer, ex.docs, ex.question)
            parts = []
            for text in (head, *docs):
                name = names.get(text)
                if name is None:
                    name = names[text] = f"calibration/{len(names)}"
                    texts[name] = text
                parts.append(name)
            self.items.append((parts, Text(tail)))
        self.modules.register_modules(texts)
        self.prompts = [self.modules.compose([*parts, tail]) for parts, tail in self.items]


def generate(llm: Any, prompts: Sequence[Any], params: dict, max_tokens: int) -> list[str]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0,
                        extra_args={"kv_transfer_params": {"promptcache_save": False, **params}})
    outs = llm.generate(list(prompts), sp, use_tqdm=False)
    return [o.outputs[0].text.strip() for o in outs]


def score(answers: Sequence[str], golds: Sequence[str], full: Sequence[str],
          questions: Sequence[str]) -> dict[str, float]:
    return {
        "exact_match": statistics.fmean(fact_qa.exact_match(a, g) for a, g in zip(answers, golds)),
        "f1": statistics.fmean(fact_qa.token_f1(a, g, q)
                               for a, g, q in zip(answers, golds, questions)),
        "agreement": statistics.fmean(a == f for a, f in zip(answers, full)),
    }


def measure(llm: Any, examples: Sequence[Example], ratios: Sequence[float] = DEFAULT_RATIOS,
            max_tokens: int = 24, prompts: Prompts | None = None) -> dict[str, Any]:
    """Full prefill, then shifted reuse at each ratio, on the same prompts and engine.
    The engine must run with position_independent on and vLLM's prefix cache off, so
    each pass sees exactly the KV it names (nothing is saved: promptcache_save off)."""
    prompts = prompts or Prompts(llm, examples)
    full = generate(llm, prompts.prompts, {"promptcache_load": False}, max_tokens)
    golds = [ex.answer if ex.answer is not None else f for ex, f in zip(examples, full)]
    questions = [ex.question for ex in examples]
    result = {"full": score(full, golds, full, questions), "ratios": {}, "answers": {"full": full}}
    for ratio in ratios:
        answers = generate(llm, prompts.prompts, {"promptcache_recompute_ratio": ratio},
                           max_tokens)
        s = score(answers, golds, full, questions)
        s["f1_minus_full"] = s["f1"] - result["full"]["f1"]
        s["exact_match_minus_full"] = s["exact_match"] - result["full"]["exact_match"]
        result["ratios"][f"{ratio:g}"] = s
        result["answers"][f"{ratio:g}"] = answers
    return result


def recommend(result: dict[str, Any], bound: float = DEFAULT_BOUND) -> float | None:
    """The smallest ratio whose F1 and exact match are both within `bound` of the full
    prefill's, or None.  F1 alone is not enough: it also moves with the answers'
    wording, and on SmolLM2 shifted reuse without recompute gave a higher F1 (+0.03)
    with fewer right answers (exact match -0.09)."""
    ok = [float(r) for r, s in result["ratios"].items()
          if s["f1_minus_full"] >= -bound and s.get("exact_match_minus_full", 0.0) >= -bound]
    return min(ok) if ok else None


# -- where records live, and what an engine does with them --------------------------------

def calibration_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "vllm-promptcache" / "calibration"


def record_key(fingerprint: Any) -> str:
    """Names a calibration by what changes answers: the weights and the dtype (a
    ModelFingerprint's fields; the model's path where its weights are unknown)."""
    who = fingerprint.weights or f"model:{fingerprint.model}"
    return hashlib.blake2b(f"{who}|{fingerprint.dtype}".encode(), digest_size=16).hexdigest()


def record_path(fingerprint: Any, directory: str | os.PathLike | None = None) -> Path:
    return Path(directory or calibration_dir()) / f"{record_key(fingerprint)}.json"


def write_record(record: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".calibration-", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh, indent=1)
    os.replace(tmp, path)


def read_record(fingerprint: Any, directory: str | os.PathLike | None = None) -> dict | None:
    path = record_path(fingerprint, directory)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("promptcache: ignoring the unreadable calibration record %s: %s", path, e)
        return None
    record["path"] = str(path)
    return record


class CalibrationFailedError(RuntimeError):
    """The model's calibration found no recompute ratio within its bound."""


def startup_check(fingerprint: Any, config: Any,
                  directory: str | os.PathLike | None = None) -> Any:
    """The config a position-independent engine runs with, given the model's calibration
    record (see the module doc): unchanged, or with the calibrated recompute ratio;
    raises CalibrationFailedError where calibration failed and the mode is enforce."""
    mode = getattr(config, "calibration", "enforce")
    if mode == "off":
        return config
    record = read_record(fingerprint, directory)
    if record is None:
        logger.warning(
            "promptcache: model %s has no calibration for position-independent reuse: how far "
            "shifted modules move its answers is unknown. Run `vllm-promptcache calibrate %s` "
            "once; it picks the recompute ratio this engine will then use.",
            fingerprint.model, fingerprint.model)
        return config
    ratio = record.get("recommended_ratio")
    if ratio is None:
        message = (f"promptcache: calibration of model {fingerprint.model} ({record['path']}) "
                   f"found no recompute ratio whose answers stay within {record.get('bound')} F1 "
                   f"of a full prefill; position-independent reuse would change answers")
        if mode == "enforce":
            raise CalibrationFailedError(
                message + ". Pass --promptcache-calibration warn (or calibration: warn) to start "
                "anyway, or recalibrate with more ratios.")
        logger.warning("%s (calibration: %s, starting anyway)", message, mode)
        return config
    if config.recompute_ratio == 0 and ratio > 0:
        logger.info("promptcache: recompute ratio %g, from the calibration of model %s (%s)",
                    ratio, fingerprint.model, record["path"])
        return dataclasses.replace(config, recompute_ratio=float(ratio))
    return config


# -- the command --------------------------------------------------------------------------

def _engine(args: argparse.Namespace):
    from vllm import LLM, SamplingParams

    from .config import PromptCacheConfig
    from .engine_config import engine_kwargs

    options = dict(host_gb=args.host_gb, disk_gb=0, position_independent=True)
    if "calibration" in {f.name for f in dataclasses.fields(PromptCacheConfig)}:
        options["calibration"] = "off"  # this engine makes the record; it must not need one
    kwargs = dict(max_model_len=args.max_model_len, enable_prefix_caching=False, seed=0,
                  dtype=args.dtype, kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        kwargs["enforce_eager"] = True
        if args.dtype == "auto":
            from .real_model import cpu_dtype

            kwargs["dtype"] = cpu_dtype()
    llm = LLM(args.model, **kwargs, **engine_kwargs(**options))
    # vLLM 0.32's CPU worker dies when an engine's first forward is a few tokens long.
    llm.generate([{"prompt_token_ids": list(range(100, 300))}], SamplingParams(max_tokens=1),
                 use_tqdm=False)
    return llm


def _table(result: dict[str, Any], recommended: float | None) -> str:
    lines = ["| setting | exact match | EM - full | token F1 | F1 - full | answers = full |",
             "|---|---|---|---|---|---|"]
    full = result["full"]
    lines.append(f"| full prefill | {full['exact_match']:.3f} | - | {full['f1']:.3f} | - | 1.00 |")
    for r, s in result["ratios"].items():
        mark = " (recommended)" if recommended is not None and float(r) == recommended else ""
        lines.append(f"| shifted, ratio {r}{mark} | {s['exact_match']:.3f} | "
                     f"{s['exact_match_minus_full']:+.3f} | {s['f1']:.3f} | "
                     f"{s['f1_minus_full']:+.3f} | {s['agreement']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="vllm-promptcache calibrate",
        description="Measure how shifted prompt modules change MODEL's answers at each "
                    "recompute ratio, and record the smallest ratio within the bound for "
                    "--promptcache-position-independent engines to use.")
    ap.add_argument("model", help="model path or name, as given to vLLM ('smollm2' and "
                                  "'tiny' build the project's models)")
    ap.add_argument("--prompts", type=Path, help="JSON lines of {documents, question, answer?} "
                                                 "(default: the built-in fact-QA set)")
    ap.add_argument("--bound", type=float, default=DEFAULT_BOUND,
                    help="largest loss of F1 and of exact match against a full prefill "
                         "(default %(default)s)")
    ap.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    ap.add_argument("--docs", type=int, default=10,
                    help="fact-QA documents (2 or 3 questions each; 4 documents a prompt)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--host-gb", type=float, default=0.5)
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where the record goes (default: %s)" % calibration_dir())
    args = ap.parse_args(argv)
    if args.bound < 0 or any(not 0 <= r < 1 for r in args.ratios):
        ap.error("--bound must be >= 0 and every --ratios value in [0, 1)")
    if args.model in ("smollm2", "tiny"):
        from .tiny_model import build_model

        args.model = build_model(args.model)
    examples = (read_prompts_file(args.prompts) if args.prompts
                else fact_qa_examples(args.docs, seed=args.seed))

    from .compat import shutdown_llm
    from .store.keys import ModelFingerprint

    llm = _engine(args)
    try:
        start = time.perf_counter()
        result = measure(llm, examples, sorted(set(args.ratios)), args.max_tokens)
        elapsed = time.perf_counter() - start
        vllm_config = llm.llm_engine.vllm_config
        options = vllm_config.kv_transfer_config.kv_connector_extra_config["promptcache"]
        # Named as the engine's scheduler names it (tp rank 0), so it finds this record.
        fingerprint = ModelFingerprint.from_vllm_config(vllm_config, tp_rank=0,
                                                        model_id=options.get("model_id", ""))
    finally:
        shutdown_llm(llm)
    recommended = recommend(result, args.bound)
    record = {
        "version": RECORD_VERSION, "model": fingerprint.model, "dtype": fingerprint.dtype,
        "weights": fingerprint.weights, "bound": args.bound, "recommended_ratio": recommended,
        "source": str(args.prompts) if args.prompts else f"fact-qa docs={args.docs} seed={args.seed}",
        "examples": len(examples), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(elapsed, 1), "full": result["full"], "ratios": result["ratios"],
    }
    path = record_path(fingerprint, args.out_dir)
    write_record(record, path)
    print(_table(result, recommended))
    print()
    if recommended is None:
        print(f"No ratio keeps F1 and exact match within {args.bound} of a full prefill: a "
              f"position-independent "
              f"engine on this model will refuse to start (--promptcache-calibration warn "
              f"overrides).")
    else:
        print(f"Recommended recompute ratio: {recommended:g} (F1 and exact match within "
              f"{args.bound} of a full prefill); engines that leave --promptcache-recompute-ratio unset use it.")
    print(f"Record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
