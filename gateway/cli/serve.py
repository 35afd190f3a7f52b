"""`ztgate serve`: run the gateway from its TOML config.

`--check` validates without serving and reports every problem at once, one line each
with its fix: files that are missing or unreadable, addresses and ports that are invalid
or already taken, a Redis URL that cannot work, production's dev-only items. Only when
those pass does it build the gateway (registry hashes, policy, receipt log) as a start
would. It never prints a traceback."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from gateway.cli import UsageError
from gateway.config import Config, ConfigError, load_config


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the gateway (mTLS API + admin listener)")
    p.add_argument("--config", type=Path, required=True, help="gateway TOML config")
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the config (files, addresses, free ports, production rules) and exit",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes serving this replica (default: listen.workers, itself 1); "
        "see docs/sizing.md",
    )
    p.set_defaults(func=_serve)


@dataclass(frozen=True)
class Problem:
    key: str
    what: str
    fix: str

    def line(self) -> str:
        return f"{self.key}: {self.what}; fix: {self.fix}"


def _file(key: str, path: Path | str | None, directory: bool = False) -> list[Problem]:
    if path is None:
        return []
    p = Path(path)
    kind = "directory" if directory else "file"
    if not p.exists():
        return [Problem(key, f"{p} does not exist", f"create the {kind} or correct the path")]
    if directory != p.is_dir():
        return [Problem(key, f"{p} is not a {kind}", f"point {key} at a {kind}")]
    if not os.access(p, os.R_OK | (os.X_OK if directory else 0)):
        return [
            Problem(key, f"{p} is not readable by this user", "give the gateway's user read access")
        ]
    return []


def check_files(cfg: Config) -> list[Problem]:
    """Every file and directory the config names: present and readable."""
    out: list[Problem] = []
    t = cfg.tls
    for name in ("cert", "key", "client_ca", "node_ca", "node_client_cert", "node_client_key"):
        out += _file(f"tls.{name}", getattr(t, name))
    out += _file("tls.crl", t.crl)
    out += _file("registry", cfg.registry, directory=True)
    out += _file("receipts.signing_key", cfg.receipts.signing_key)
    out += _file("receipts.log_key", cfg.receipts.log_key)
    out += _file("pkcs11.module", cfg.pkcs11.module)
    out += _file("pkcs11.pin_file", cfg.pkcs11.pin_file)
    out += _file("policy.bundle", cfg.policy.bundle)
    out += _file("jobs.key_file", cfg.jobs.key_file)
    out += _file("policy.dir", cfg.policy.dir, directory=True)
    for name in ("ca", "crl", "cert", "key", "core_ca"):  # read only once serving starts
        out += _file(f"forward.{name}", getattr(cfg.forward, name))
    for i, key in enumerate(cfg.policy.officer_keys):
        out += _file(f"policy.officer_keys[{i}]", key)
    out += _file("mpc.dealer_cert", cfg.mpc.dealer_cert)
    out += _file("mpc.dealer_key", cfg.mpc.dealer_key)
    for i, art in enumerate(cfg.zk.artefacts):
        out += _file(f"zk.artefacts[{i}]", art, directory=True)
    if cfg.state.redis_url:
        query = dict(parse_qsl(urlsplit(cfg.state.redis_url).query))
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            out += _file(f"state.redis_url {name}", query.get(name))
    return out


def _host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        labels = host.rstrip(".").split(".")
        return bool(host) and all(
            0 < len(label) <= 63 and label.replace("-", "").isalnum() for label in labels
        )


def _host_port(key: str, value: str, zero_ok: bool = False) -> list[Problem]:
    host, sep, port = value.rpartition(":")
    fix = f'write {key} as "host:port"'
    if not sep or not _host_ok(host):
        return [Problem(key, f"{value!r} is not a host:port address", fix)]
    if not port.isdigit() or not (0 if zero_ok else 1) <= int(port) <= 65535:
        return [Problem(key, f"{value!r} has no valid port", fix)]
    return []


def check_addresses(cfg: Config) -> list[Problem]:
    """Listen addresses, ports, node addresses and the Redis URL, without the network."""
    out: list[Problem] = []
    lst = cfg.listen
    for key, host in (("listen.host", lst.host), ("listen.admin_host", lst.admin_host)):
        if not _host_ok(host):
            out.append(Problem(key, f"{host!r} is not an IP address or host name", "fix it"))
    for key, port in (("listen.port", lst.port), ("listen.admin_port", lst.admin_port)):
        if not 1 <= port <= 65535:
            out.append(Problem(key, f"{port} is not a TCP port", "use 1-65535"))
    if lst.port == lst.admin_port:
        out.append(
            Problem(
                "listen.admin_port",
                f"is the API port {lst.port}",
                "give the unauthenticated admin listener its own port",
            )
        )
    for i, n in enumerate(cfg.nodes):
        out += _host_port(f"nodes[{i}] ({n.name}).address", n.address)
        if n.mpc_address:
            out += _host_port(f"nodes[{i}] ({n.name}).mpc_address", n.mpc_address)
    out += _host_port("mpc.dealer_listen", cfg.mpc.dealer_listen, zero_ok=True)
    for key, url in [("receipts.public_url", cfg.receipts.public_url)] + [
        (f"receipts.replicas[{i}]", u) for i, u in enumerate(cfg.receipts.replicas)
    ]:
        if url is not None and not (urlsplit(url).scheme == "https" and urlsplit(url).hostname):
            out.append(Problem(key, f"{url!r} is not an https:// URL", "write https://host:port"))
    if cfg.state.redis_url:
        out += _redis_url(cfg.state.redis_url)
    return out


def _redis_url(url: str) -> list[Problem]:
    key = "state.redis_url"
    fix = "write rediss://USER:PASSWORD@HOST:PORT/DB?ssl_ca_certs=/path/ca.crt"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return [Problem(key, f"cannot be parsed ({exc})", fix)]
    if parts.scheme not in ("redis", "rediss", "unix"):
        return [Problem(key, f"scheme {parts.scheme!r} is not redis:// or rediss://", fix)]
    if parts.scheme != "unix" and not parts.hostname:
        return [Problem(key, "names no host", fix)]
    if port == 0:
        return [Problem(key, "port 0", fix)]
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        return [Problem(key, f"database {db!r} is not a number", fix)]
    return []


def check_ports(cfg: Config) -> list[Problem]:
    """The listen ports can be bound now: a clash is found before any slow start-up."""
    out: list[Problem] = []
    listeners = [
        ("listen.port", cfg.listen.host, cfg.listen.port),
        ("listen.admin_port", cfg.listen.admin_host, cfg.listen.admin_port),
    ]
    if cfg.forward.port is not None:  # bound only once the API is up: found here first
        listeners.append(("forward.port", cfg.forward.host, cfg.forward.port))
    for key, host, port in listeners:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            out.append(Problem(key, f"cannot resolve {host} ({exc.strerror})", "fix the host"))
            continue
        family, kind, proto, _, addr = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    what = f"port {port} on {host} is in use by another process"
                    fix = "stop it or choose another port"
                elif exc.errno == errno.EACCES:
                    what = f"port {port} on {host} needs privileges this user lacks"
                    fix = "use a port above 1023 or grant CAP_NET_BIND_SERVICE"
                else:
                    what, fix = f"cannot bind {host}:{port} ({exc.strerror})", "fix the address"
                out.append(Problem(key, what, fix))
    return out


def check_mode_items(cfg: Config) -> list[Problem]:
    """Production refuses each dev-only item (each item's text carries its fix)."""
    if cfg.mode != "production":
        return []
    try:
        items = cfg.dev_only_items()
    except (OSError, ValueError) as exc:  # a certificate that cannot be read or parsed
        return [Problem("tls", f"cannot inspect the certificates ({exc})", "fix the files")]
    return [
        Problem("mode = production", item, 'fix the item, or set mode = "dev" to allow it')
        for item in items
    ]


def preflight(cfg: Config) -> list[Problem]:
    """Everything that can be checked in a moment, all of it, before any slow work."""
    return check_files(cfg) + check_addresses(cfg) + check_mode_items(cfg) + check_ports(cfg)


def _report(config: Path, problems: list[Problem]) -> int:
    for p in problems:
        print(f"ztgate: error: {config}: {p.line()}", file=sys.stderr)
    print(f"ztgate: {config}: {len(problems)} problem(s)", file=sys.stderr)
    return 2


def _check(args: argparse.Namespace) -> int:
    from gateway import runtime

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        return _report(args.config, [Problem("config", str(exc), "correct that key")])
    cfg = with_workers(cfg, args.workers)
    problems = preflight(cfg)
    if cfg.listen.workers > 1:
        from gateway.supervisor import refusals

        problems += [
            Problem("listen.workers", what, "see docs/sizing.md") for what in refusals(cfg)
        ]
    if problems:
        return _report(args.config, problems)
    try:
        # Built as a start would, then closed: the process (a test, an embedding program)
        # may check again, or serve, with the same data dir and its locks.
        runtime.close_unserved(runtime.build_gateway(cfg))
    except ConfigError as exc:
        return _report(args.config, [Problem("start", str(exc), "see the message")])
    except Exception as exc:  # never a traceback from --check: one line naming it
        what = f"{type(exc).__name__}: {exc}"
        return _report(args.config, [Problem("start", what, "see the message")])
    print(f"{args.config}: OK ({cfg.mode} mode, {len(cfg.nodes)} nodes)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from gateway import runtime

    if args.check:
        return _check(args)
    try:
        cfg = with_workers(load_config(args.config), args.workers)
        # A port clash is found now, not after minutes of start-up work.
        clashes = check_ports(cfg)
        if clashes:
            raise UsageError("; ".join(p.line() for p in clashes))
        # Logs, evidence and state hold clients' data: nothing the gateway writes is
        # readable by another user of the host.
        os.umask(0o077)
        if cfg.listen.workers > 1:
            from gateway import supervisor

            return supervisor.run(cfg)
        runtime.run(cfg)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    return 0


def with_workers(cfg: Config, workers: int | None) -> Config:
    """`--workers N` over `listen.workers`."""
    if workers is None:
        return cfg
    try:
        return replace(cfg, listen=replace(cfg.listen, workers=workers))
    except ConfigError as exc:
        raise UsageError(f"--workers: {exc}") from exc
