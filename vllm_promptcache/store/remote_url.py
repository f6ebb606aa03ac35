"""`--promptcache-remote-url`: where the shared remote tier lives.

Forms (Redis >= 6 or Valkey; served by redis-py):

    redis://[[user]:password@]HOST[:PORT][/DB]        plain TCP (port 6379, db 0 by default)
    rediss://[[user]:password@]HOST[:PORT][/DB]       TLS; ?ssl_ca_certs=PATH, ?ssl_cert_reqs=
                                                      none|optional|required, ?ssl_certfile=,
                                                      ?ssl_keyfile= (client certificate)
    unix://[[user]:password@]/PATH.sock[?db=N]        a local socket
    redis+cluster://[[user]:password@]HOST:PORT[,HOST:PORT...]
    rediss+cluster://...                              Redis Cluster (db 0 only): any of
                                                      its nodes; the client finds the rest

User and password are percent-decoded.  A URL without a password takes it from
the environment (`PROMPTCACHE_REMOTE_PASSWORD`), so it need not appear on a
command line.  `masked()` is the form that goes into logs: the password is `***`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import parse_qsl, quote, unquote

OPTION = "--promptcache-remote-url"
PASSWORD_ENV = "PROMPTCACHE_REMOTE_PASSWORD"
DEFAULT_PORT = 6379
_SCHEMES = {"redis": (False, False), "rediss": (True, False), "unix": (False, False),
            "redis+cluster": (False, True), "rediss+cluster": (True, True)}
_TLS_QUERY = ("ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile")
_CERT_REQS = ("none", "optional", "required")


class RemoteURLError(ValueError):
    """A remote-tier URL that cannot be used; the message names the option."""


@dataclass(frozen=True)
class RemoteURL:
    scheme: str
    hosts: tuple[tuple[str, int], ...] = ()   # TCP forms; several only for a cluster
    path: str = ""                            # unix socket path
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    cluster: bool = False
    tls_options: tuple[tuple[str, str], ...] = ()

    def masked(self) -> str:
        """The URL for logs: everything but the password, which is `***`."""
        auth = ""
        if self.username or self.password:
            auth = quote(self.username or "", safe="")
            if self.password:
                auth += ":***"
            auth += "@"
        query = dict(self.tls_options)
        if self.scheme == "unix":
            if self.db:
                query["db"] = str(self.db)
            where, db = self.path, ""
        else:
            where = ",".join(f"{_host_text(h)}:{p}" for h, p in self.hosts)
            db = f"/{self.db}" if self.db and not self.cluster else ""
        tail = "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""
        return f"{self.scheme}://{auth}{where}{db}{tail}"

    def __str__(self) -> str:
        return self.masked()

    def client_kwargs(self) -> dict:
        """Keyword arguments for redis-py's `Redis` (or, without host/port/db,
        `RedisCluster`), less timeouts and retries, which the store sets."""
        kw: dict = {}
        if self.username:
            kw["username"] = self.username
        if self.password:
            kw["password"] = self.password
        if self.scheme == "unix":
            kw["unix_socket_path"] = self.path
        elif not self.cluster:
            kw["host"], kw["port"] = self.hosts[0]
        if not self.cluster:
            kw["db"] = self.db
        if self.tls:
            kw["ssl"] = True
            kw.update(self.tls_options)
        return kw


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _fail(url: str, why: str) -> RemoteURLError:
    # Never echo a password back: show the scheme and what is wrong only.
    scheme = url.split("://", 1)[0] if "://" in url else url[:16]
    return RemoteURLError(
        f"{OPTION}: {why} (got a {scheme!r} URL); expected redis://[user:pass@]HOST:PORT/DB, "
        f"rediss://..., unix:///path.sock[?db=N] or redis+cluster://HOST:PORT[,HOST:PORT...]")


def _parse_port(text: str, url: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise _fail(url, f"port {text!r} is not a number in [1, 65535]")
    return int(text)


def _parse_hosts(text: str, url: str, several: bool) -> tuple[tuple[str, int], ...]:
    hosts = []
    for part in text.split(",") if several else [text]:
        if part.startswith("["):                      # [IPv6]:port
            host, sep, rest = part[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise _fail(url, f"bad IPv6 host {part!r}")
            port = rest[1:]
        else:
            host, _, port = part.partition(":")
        if not host:
            raise _fail(url, "no host")
        hosts.append((host, _parse_port(port, url) if port else DEFAULT_PORT))
    return tuple(hosts)


def parse_remote_url(url: str, environ: Mapping[str, str] | None = None) -> RemoteURL:
    """Parse and check a remote-tier URL; the password falls back to
    `PROMPTCACHE_REMOTE_PASSWORD` from `environ` (default os.environ)."""
    if not isinstance(url, str) or "://" not in url:
        raise _fail(str(url), "not a URL")
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme not in _SCHEMES:
        raise _fail(url, f"unknown scheme {scheme!r}")
    tls, cluster = _SCHEMES[scheme]
    rest, _, fragment = rest.partition("#")
    if fragment:
        raise _fail(url, "a URL fragment (#...) means nothing here")
    rest, _, query_text = rest.partition("?")
    try:
        query = dict(parse_qsl(query_text, keep_blank_values=True, strict_parsing=bool(query_text)))
    except ValueError:
        raise _fail(url, "malformed query string") from None
    # userinfo ends at the last '@' before the path (a password may contain '@' encoded or not)
    slash = rest.find("/")
    authority, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    userinfo, at, authority = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon and pw else None

    db = 0
    hosts: tuple[tuple[str, int], ...] = ()
    sock = ""
    if scheme == "unix":
        if authority:
            raise _fail(url, f"a unix URL has no host ({authority!r}); write unix:///path.sock")
        sock = unquote(path)
        if not sock or sock == "/":
            raise _fail(url, "no socket path")
        if "db" in query:
            db = _parse_db(query.pop("db"), url)
    else:
        hosts = _parse_hosts(authority, url, several=cluster)
        db_text = path.strip("/")
        if db_text:
            if cluster:
                raise _fail(url, "Redis Cluster has only database 0; drop the /DB")
            db = _parse_db(db_text, url)
        if "db" in query and not cluster:
            db = _parse_db(query.pop("db"), url)
    tls_options = []
    for key in list(query):
        if tls and key in _TLS_QUERY:
            value = query.pop(key)
            if key == "ssl_cert_reqs" and value not in _CERT_REQS:
                raise _fail(url, f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
            tls_options.append((key, value))
    if query:
        raise _fail(url, f"unknown query parameter(s) {', '.join(sorted(query))}")

    env = os.environ if environ is None else environ
    if password is None and env.get(PASSWORD_ENV):
        password = env[PASSWORD_ENV]
    return RemoteURL(scheme=scheme, hosts=hosts, path=sock, db=db, username=username,
                     password=password, tls=tls, cluster=cluster,
                     tls_options=tuple(tls_options))


def _parse_db(text: str, url: str) -> int:
    if not text.isdigit():
        raise _fail(url, f"database {text!r} is not a number")
    return int(text)
