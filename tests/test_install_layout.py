"""`kernels/` lives outside `vllm_promptcache/` in the source tree and is installed as
`vllm_promptcache.kernels`: the package must import both ways -- from a regular (not
editable) install, run anywhere, and from the repository root, where the checkout's
`vllm_promptcache/` shadows the installed one (the worker then imports the kernels)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import vllm_promptcache.kernels as k, vllm_promptcache.kernels.block_copy as b, "
         "vllm_promptcache.kernels.rope_shift, vllm_promptcache.connector.worker; "
         "print(b.__file__)")


def _run(cwd: str, pythonpath: str) -> str:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
    """A regular install of this checkout into a directory of its own (no deps: vLLM and
    torch come from the environment)."""
    target = str(tmp_path_factory.mktemp("site"))
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            "--no-build-isolation", "--target", target, REPO],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    assert os.path.isfile(os.path.join(target, "vllm_promptcache", "kernels", "block_copy.py"))
    # The C loop's source ships beside its loader, which builds it on first use.
    assert os.path.isfile(os.path.join(target, "vllm_promptcache", "kernels", "cpu_shifted.c"))
    return target


def test_installed_package_imports_away_from_the_checkout(installed, tmp_path):
    found = _run(str(tmp_path), installed)
    assert found.startswith(installed)


def test_checkout_shadowing_an_install_imports_the_kernels(installed):
    found = _run(REPO, installed)
    assert found == os.path.join(REPO, "kernels", "block_copy.py")
