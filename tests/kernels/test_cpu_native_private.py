"""The C loop is built and loaded only from a private folder: created 0700, one of
ours tightened, one of another user refused; the library is checked (a regular file
of this user nobody else can write) right before CDLL, and one that fails the check
is rebuilt, never loaded (issue 29: it was built into a predictable /tmp path and
loaded without checking its owner)."""

from __future__ import annotations

import os
import stat

import pytest

from vllm_promptcache.kernels import cpu_native

CC = os.environ.get("CC", "cc")


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build (a compile takes a while on two cores); the tests below that
    need another build copy its bytes in place of running the compiler again."""
    folder = tmp_path_factory.mktemp("built") / "native"
    old = os.environ.get("PROMPTCACHE_NATIVE_DIR")
    os.environ["PROMPTCACHE_NATIVE_DIR"] = str(folder)
    try:
        return cpu_native._build(CC).read_bytes()
    finally:
        if old is None:
            del os.environ["PROMPTCACHE_NATIVE_DIR"]
        else:
            os.environ["PROMPTCACHE_NATIVE_DIR"] = old


@pytest.fixture
def native_dir(tmp_path, monkeypatch, built):
    folder = tmp_path / "cache" / "native"
    monkeypatch.setenv("PROMPTCACHE_NATIVE_DIR", str(folder))
    real_run = cpu_native.subprocess.run

    def compile_from_cache(cmd, **kwargs):
        if cmd[0] != CC:
            return real_run(cmd, **kwargs)
        out = cmd[cmd.index("-o") + 1]
        with open(out, "wb") as fh:  # as the compiler does: into the file it is given
            fh.write(built)
        return cpu_native.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cpu_native.subprocess, "run", compile_from_cache)
    return folder


def test_the_library_is_built_in_a_0700_folder_and_loads(native_dir):
    fn = cpu_native._load(CC)
    assert fn is not None
    (lib,) = native_dir.iterdir()
    assert mode(native_dir) == 0o700
    assert os.lstat(lib).st_uid == os.getuid() and not mode(lib) & 0o022
    assert cpu_native._build(CC) == lib, "built once, then reused"


def test_an_open_folder_of_ours_is_tightened(native_dir):
    native_dir.mkdir(parents=True)
    os.chmod(native_dir, 0o777)
    cpu_native._build(CC)
    assert mode(native_dir) == 0o700


@pytest.mark.parametrize("tamper", ["group-writable", "symlink", "another owner"])
def test_a_library_that_fails_the_check_is_rebuilt_not_loaded(native_dir, tmp_path, tamper):
    lib = cpu_native._build(CC)
    planted = tmp_path / "planted.so"
    planted.write_bytes(b"not a library")
    if tamper == "group-writable":
        os.chmod(lib, 0o666)
    elif tamper == "symlink":
        os.unlink(lib)
        os.symlink(planted, lib)
    else:
        if os.getuid() != 0:
            pytest.skip("changing a file's owner needs root")
        os.chown(lib, 12345, 12345)
    with pytest.raises(cpu_native.NotPrivate):
        cpu_native._check_private(lib)
    rebuilt = cpu_native._build(CC)
    assert rebuilt == lib and not os.path.islink(lib)
    cpu_native._check_private(lib)
    assert os.lstat(lib).st_uid == os.getuid() and planted.read_bytes() == b"not a library"
    assert cpu_native._load(CC) is not None


def test_a_folder_of_another_user_is_refused(native_dir, tmp_path, monkeypatch):
    if os.getuid() != 0:
        pytest.skip("changing a folder's owner needs root")
    native_dir.mkdir(parents=True, mode=0o700)
    os.chown(native_dir, 12345, 12345)
    with pytest.raises(cpu_native.NotPrivate):
        cpu_native._private_folder(native_dir)
    # The build goes to this user's own temporary folder instead, never into theirs.
    monkeypatch.setattr(cpu_native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    lib = cpu_native._build(CC)
    assert lib.parent == tmp_path / "tmp" / f"vllm-promptcache-native-{os.getuid()}"
    assert mode(lib.parent) == 0o700 and not any(native_dir.iterdir())


def test_a_library_in_an_open_folder_is_not_loaded(native_dir):
    lib = cpu_native._build(CC)
    os.chmod(native_dir, 0o755)
    with pytest.raises(cpu_native.NotPrivate):
        cpu_native._check_private(lib)
