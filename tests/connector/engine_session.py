"""One engine's life in its own process, for tests that restart engines on one disk tier:

    python -m tests.connector.engine_session JOB.json OUT.json

JOB: {"model": path, "engine": {LLM kwargs}, "promptcache": {engine_kwargs options}
      (absent: no plugin), "modules": {name: text} (registered first),
      "steps": [{"prompt": [ids] | "compose": [items], "max_tokens": n,
                 "lora": [name, int id, path] | null, "salt": str | null}, ...]}
A compose item is a module name or {"text": "..."}.  Steps run one at a time, in
order.  OUT: {"outputs": [[token ids], ...], "prompts": [[ids], ...], "metrics": {...}}.
With the plugin on, the process waits until the disk tier's writes have landed
(the engine keeps stepping while any is pending) before it exits.
"""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_session(job: dict, directory, name: str) -> dict:
    """Run JOB in its own engine process (as another server would); its OUT."""
    job_file, out = directory / f"{name}.json", directory / f"{name}.out.json"
    job_file.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "tests.connector.engine_session", str(job_file),
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def kv_files(directory):
    out = {}
    for root, _, names in os.walk(directory or "/nonexistent"):
        for n in names:
            if n.endswith(".kv"):
                p = os.path.join(root, n)
                out[p] = os.path.getsize(p)
    return out


def main():
    job_path, out_path = sys.argv[1:3]
    job = json.load(open(job_path))
    from vllm import SamplingParams

    from tests.conftest import close_llm, make_llm
    from vllm_promptcache import PromptModules, Text, engine_kwargs, read_metrics

    kwargs = dict(job.get("engine", {}))
    options = job.get("promptcache")
    if options is not None:
        kwargs.update(engine_kwargs(**options))
    llm = make_llm(job["model"], **kwargs)
    modules = None
    if job.get("modules"):
        modules = PromptModules(llm)
        modules.register_modules(job["modules"])
    outputs, prompts = [], []
    for step in job["steps"]:
        if "compose" in step:
            items = [Text(i["text"]) if isinstance(i, dict) else i for i in step["compose"]]
            prompt = modules.compose(items).token_ids
        else:
            prompt = step["prompt"]
        p = {"prompt_token_ids": prompt}
        if step.get("salt"):
            p["cache_salt"] = step["salt"]
        lora = None
        if step.get("lora"):
            from vllm.lora.request import LoRARequest

            lora = LoRARequest(*step["lora"])
        sp = SamplingParams(max_tokens=step.get("max_tokens", 8), temperature=0, ignore_eos=True)
        out = llm.generate([p], sp, lora_request=lora, use_tqdm=False)[0].outputs[0]
        outputs.append(list(out.token_ids))
        prompts.append(list(prompt))
    disk = (options or {}).get("disk_path")
    if disk:  # the engine keeps stepping until its writes land: wait for the files to settle
        start = time.time()
        last, deadline = None, start + 60
        while time.time() < deadline:
            now = kv_files(disk)
            if now == last and (now or time.time() - start > 5):
                break
            last = now
            time.sleep(0.5)
    metrics = read_metrics(llm) if options is not None else {}
    close_llm(llm)
    json.dump({"outputs": outputs, "prompts": prompts, "metrics": metrics}, open(out_path, "w"))


if __name__ == "__main__":
    main()
