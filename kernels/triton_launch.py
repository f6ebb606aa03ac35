"""What every Triton kernel here needs at launch: is Triton importable, and the kernel
to launch -- an interpreted one under TRITON_INTERPRET=1 even when the module was
imported (and the kernel decorated) before the variable was set, as the tests and
the CPU benches do."""

from __future__ import annotations

import os
import types
from typing import Any

try:
    import triton  # noqa: F401
    from triton.runtime.interpreter import InterpretedFunction

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU installs without triton use the references
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_interpreted: dict[int, Any] = {}


def launchable(kernel: Any, helpers: dict[str, Any] | None = None) -> Any:
    """`kernel`, or under the interpreter an interpreted copy of it whose globals name
    interpreted copies of the jitted `helpers` it calls."""
    if not interpreting() or isinstance(kernel, InterpretedFunction):
        return kernel
    found = _interpreted.get(id(kernel))
    if found is None:
        fn = kernel.fn
        scope = dict(fn.__globals__)
        for name, helper in (helpers or {}).items():
            scope[name] = InterpretedFunction(helper.fn)
        clone = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__,
                                   fn.__closure__)
        clone.__kwdefaults__ = fn.__kwdefaults__
        clone.__annotations__ = fn.__annotations__
        found = _interpreted[id(kernel)] = InterpretedFunction(clone)
    return found
