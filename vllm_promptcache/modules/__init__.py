"""Prompt modules (Prompt Cache): register text once, reuse its KV anywhere.

- registry.py: the module table, the encoding sequence, `compose`;
- offline.py: `PromptModules(llm)` for `LLM(...)`;
- server.py: the OpenAI server's routes, registration file and request hook;
- pml.py: Prompt Cache's markup (schemas and prompts).
"""

from .registry import (Boundary, ComposedPrompt, Module, ModuleCapacityError, ModuleError,
                       Text, UnknownModuleError)

__all__ = ["Boundary", "ComposedPrompt", "Module", "ModuleCapacityError", "ModuleError",
           "PromptModules", "Text", "UnknownModuleError"]


def __getattr__(name):
    if name == "PromptModules":  # imports vLLM lazily
        from .offline import PromptModules

        return PromptModules
    raise AttributeError(name)
