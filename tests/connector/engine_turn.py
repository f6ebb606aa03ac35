"""Engine 1 of the restart tests, run as its own process:

    python -m tests.connector.engine_turn MODEL DISK_DIR SPEC.json OUT.json

Serves one turn of each conversation in SPEC ({name: prompt token ids}) with the
disk tier in DISK_DIR, waits until each conversation's files are on disk, writes
{name: {"tokens": [...], "files": [...]}} to OUT, and exits.
"""

import json
import os
import sys
import time


def kv_files(directory):
    out = set()
    for root, _, names in os.walk(directory):
        out |= {os.path.join(root, n) for n in names if n.endswith(".kv")}
    return out


def main():
    model, disk_dir, spec_path, out_path = sys.argv[1:5]
    from vllm import SamplingParams

    from tests.conftest import close_llm, make_llm
    from vllm_promptcache import engine_kwargs

    spec = json.load(open(spec_path))
    llm = make_llm(model, enable_prefix_caching=False,
                   **engine_kwargs(host_gb=0.004, disk_path=disk_dir, disk_gb=1))
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    result = {}
    for name, prompt in spec.items():
        before = kv_files(disk_dir)
        out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0].outputs[0]
        new, deadline = set(), time.time() + 60
        while time.time() < deadline:  # the engine keeps stepping until its writes are done
            new = kv_files(disk_dir) - before
            if new:
                time.sleep(0.5)
                if kv_files(disk_dir) - before == new:
                    break
            time.sleep(0.1)
        result[name] = {"tokens": list(out.token_ids), "files": sorted(new)}
    close_llm(llm)
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main()
