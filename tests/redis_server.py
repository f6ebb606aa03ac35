"""Real Redis servers for the remote tier's tests (`redis-server` from the OS).

Each server listens on a free loopback port (and a unix socket in its own
temporary directory), keeps nothing on disk (`--save ""`, `--appendonly no`) and
is stopped by its PID.  Tests that use these fixtures are skipped only when the
`redis-server` binary is missing (`.ci/run` installs it).

Import the fixtures into a test module:

    from tests.redis_server import redis_cluster, redis_server, redis_servers  # noqa: F401
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
START_TIMEOUT_S = 10.0


def _redis_major() -> int:
    """redis-server's major version (7.0 gates DEBUG behind enable-debug-command, which
    older servers refuse as an unknown option)."""
    global _MAJOR
    if _MAJOR is None:
        out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True).stdout
        version = out.partition(" v=")[2].split(".")[0]
        _MAJOR = int(version) if version.isdigit() else 0
    return _MAJOR


_MAJOR: int | None = None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node also its bus port (port + 10000)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 40000)
        if _port_free(port) and (not cluster or _port_free(port + 10000)):
            return port
    raise RuntimeError("no free port for redis-server")


class RedisServer:
    """One redis-server process; start / kill / restart on the same port."""

    def __init__(self, directory: str, args: tuple[str, ...] = (), password: str | None = None,
                 cluster: bool = False, tls: bool = False):
        self.directory = directory
        self.password = password
        self.cluster = cluster
        self.tls = tls
        self.ca_file = os.path.join(directory, "cert.pem")
        self.port = free_port(cluster)
        self.socket_path = os.path.join(directory, "redis.sock")
        self.args = tuple(args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_file}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}"

    def _make_certificate(self) -> list[str]:
        """A self-signed certificate for 127.0.0.1 (its own CA); TLS only, no client
        certificates."""
        key = os.path.join(self.directory, "key.pem")
        if not os.path.exists(self.ca_file):
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                            "-keyout", key, "-out", self.ca_file],
                           check=True, capture_output=True, timeout=30)
        return ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.ca_file,
                "--tls-key-file", key, "--tls-ca-cert-file", self.ca_file,
                "--tls-auth-clients", "no"]

    def start(self) -> "RedisServer":
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", self.directory, "--save", "", "--appendonly", "no",
               "--daemonize", "no", "--logfile", os.path.join(self.directory, "redis.log"),
               "--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        if _redis_major() >= 7:  # DEBUG SLEEP from loopback: a store made slow on purpose
            cmd += ["--enable-debug-command", "local"]
        if self.password:
            cmd += ["--requirepass", self.password]
        if self.tls:
            cmd += self._make_certificate()  # later --port wins over the first
        if self.cluster:
            cmd += ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                    "--cluster-config-file", os.path.join(self.directory, "nodes.conf")]
        self.proc = subprocess.Popen(cmd + list(self.args), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: "
                                   f"{self.proc.stderr.read().decode()[-2000:]}{self.log()}")
            try:
                if self.client(timeout=0.2).ping():
                    return self
            except Exception:
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer: {self.log()}")

    def log(self) -> str:
        try:
            with open(os.path.join(self.directory, "redis.log")) as fh:
                return fh.read()[-2000:]
        except OSError:
            return ""

    def client(self, timeout: float = 5.0):
        import redis

        tls = {"ssl": True, "ssl_ca_certs": self.ca_file} if self.tls else {}
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           socket_timeout=timeout, socket_connect_timeout=timeout, **tls)

    def _signal(self, sig: int, wait_s: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL: the store dies at once, as in a crash."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def restart(self) -> "RedisServer":
        """Start a fresh (empty) server on the same port after kill() / stop()."""
        self.stop()
        return self.start()


class RedisCluster:
    """Three masters, no replicas, slots spread by `redis-cli --cluster create`."""

    def __init__(self, root: str, nodes: int = 3):
        self.nodes = []
        for i in range(nodes):
            d = os.path.join(root, f"node{i}")
            os.makedirs(d)
            self.nodes.append(RedisServer(d, cluster=True))

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> "RedisCluster":
        for n in self.nodes:
            n.start()
        cmd = [REDIS_CLI, "--cluster", "create",
               *(f"127.0.0.1:{n.port}" for n in self.nodes),
               "--cluster-replicas", "0", "--cluster-yes"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            infos = [n.client().execute_command("CLUSTER", "INFO") for n in self.nodes]
            if all(b"cluster_state:ok" in i for i in infos):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"cluster did not become ok: {infos}")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def _need_redis() -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")


@pytest.fixture
def redis_servers():
    """A factory: `redis_servers(*args, password=None, start=True, tls=False)` starts
    a server with extra redis-server arguments (start=False: only picks its port
    and directory; tls=True: TLS only, with a self-signed certificate made by
    `openssl`); every server it made is stopped at the end."""
    _need_redis()
    started = []
    with tempfile.TemporaryDirectory(prefix="promptcache-redis-") as root:
        def make(*args: str, password: str | None = None, start: bool = True,
                 tls: bool = False) -> RedisServer:
            d = tempfile.mkdtemp(dir=root)
            server = RedisServer(d, args, password=password, tls=tls)
            started.append(server)
            return server.start() if start else server
        try:
            yield make
        finally:
            for server in started:
                server.stop()


@pytest.fixture
def redis_server(redis_servers) -> RedisServer:
    return redis_servers()


@pytest.fixture(scope="module")
def redis_cluster():
    _need_redis()
    if REDIS_CLI is None:
        pytest.skip("redis-cli is not installed")
    with tempfile.TemporaryDirectory(prefix="promptcache-redis-cluster-") as root:
        cluster = RedisCluster(root)
        try:
            yield cluster.start()
        finally:
            cluster.stop()
