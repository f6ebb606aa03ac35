"""vllm-promptcache: reuse KV that a vLLM server already computed.

    from vllm import LLM
    from vllm_promptcache import engine_kwargs, read_metrics
    llm = LLM(model, **engine_kwargs(host_gb=4))

or `vllm serve MODEL --promptcache` (`vllm-promptcache serve ...` on CPU builds).
Prompt modules: `PromptModules(llm)` (register_module, compose).
"""

from .compat import check_vllm_version as _check_vllm_version

__version__ = "0.1.0"
_check_vllm_version()

from .config import PromptCacheConfig, PromptCacheConfigError, build_config  # noqa: E402
from .engine_config import engine_kwargs  # noqa: E402
from .modules import (ModuleCapacityError, ModuleError, Text,  # noqa: E402
                      UnknownModuleError)


def __getattr__(name):
    if name == "PromptModules":  # imports vLLM only when used
        from .modules.offline import PromptModules

        return PromptModules
    raise AttributeError(name)


def read_metrics(llm):
    """The prompt cache's counters of an offline LLM; see metrics.read_metrics."""
    from .metrics import read_metrics as _read

    return _read(llm)


__all__ = ["ModuleCapacityError", "ModuleError", "PromptCacheConfig", "PromptCacheConfigError",
           "PromptModules", "Text", "UnknownModuleError", "build_config", "engine_kwargs",
           "read_metrics", "__version__"]
