"""Source-tree stand-in for `vllm_promptcache.kernels`, whose code lives in the top-level
`kernels/` directory (pyproject.toml maps it there, so an installed package has the real
one).  Run from a checkout -- where this `vllm_promptcache/` shadows any installed copy
-- the package's submodules are found in `kernels/` and its `__init__` runs from there."""

import os as _os

_KERNELS = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(
    _os.path.abspath(__file__)))), "kernels")
__path__ = [_KERNELS]
_init = _os.path.join(_KERNELS, "__init__.py")
with open(_init) as _f:
    exec(compile(_f.read(), _init, "exec"))
