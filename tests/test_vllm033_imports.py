"""The plugin against vLLM 0.33's source, without running it: every `from vllm... import
name` in the package resolves to a module and a name defined there, and the connector
hooks we override exist in 0.33's KVConnectorBase_V1 with the same parameters.  0.33's
wheel needs CUDA to import, so this reads its source (ast) instead; .ci/run unpacks it
(pip download --no-deps vllm==0.33.0) and points PROMPTCACHE_VLLM033_SRC at it.
Skipped when that source is not on the machine."""

import ast
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SRC = Path(os.environ.get("PROMPTCACHE_VLLM033_SRC", "/tmp/vllm033/src"))
BASE = "vllm/distributed/kv_transfer/kv_connector/v1/base.py"

pytestmark = pytest.mark.skipif(not (SRC / BASE).is_file(),
                                reason=f"vLLM 0.33 source not unpacked at {SRC}")


def _plugin_files():
    for root in (REPO / "vllm_promptcache", REPO / "kernels"):
        yield from root.rglob("*.py")


def _vllm_imports():
    """(file, module, name or None) for every vLLM import in the package."""
    for path in _plugin_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and (node.module == "vllm" or node.module.startswith("vllm.")):
                for alias in node.names:
                    yield path, node.module, alias.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("vllm."):
                        yield path, alias.name, None


def _module_file(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _defined(path: Path) -> set[str]:
    names = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # lazy __getattr__ tables and __all__ entries
    return names


def test_every_vllm_import_resolves():
    missing = []
    seen = set()
    for path, module, name in _vllm_imports():
        if (module, name) in seen:
            continue
        seen.add((module, name))
        found = _module_file(module)
        if found is None:
            missing.append(f"{path.name}: module {module}")
        elif name is not None and name not in _defined(found) \
                and _module_file(f"{module}.{name}") is None:
            missing.append(f"{path.name}: {module}.{name}")
    assert seen, "the scan found no vLLM imports"
    assert not missing, f"not in vLLM 0.33: {missing}"


def _methods(path: Path, cls: str) -> dict[str, list[str]]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {f.name: [a.arg for a in f.args.args]
                    for f in node.body if isinstance(f, ast.FunctionDef)}
    raise AssertionError(f"no class {cls} in {path}")


def test_overridden_connector_hooks_match_the_base():
    base = _methods(SRC / BASE, "KVConnectorBase_V1")
    ours = _methods(REPO / "vllm_promptcache" / "connector" / "__init__.py",
                    "PromptCacheConnector")
    assert base["requires_piecewise_for_cudagraph"] == ["cls", "extra_config"]
    for name, params in ours.items():
        if name in base and not name.startswith("__"):
            assert len(params) == len(base[name]), (name, params, base[name])


def test_gpu_data_path_names_exist():
    torch_utils = _defined(SRC / "vllm/utils/torch_utils.py")
    assert "get_accelerator_view_from_cpu_tensor" in torch_utils
    forward = (SRC / "vllm/forward_context.py").read_text()
    assert "cudagraph_runtime_mode" in forward
