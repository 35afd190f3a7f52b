"""Config parsing, and production mode refusing every dev-only item, each on its own."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_config, parse_config
from gateway.pki import PKI
from gateway.runtime import ProductionRefused, check_mode
from tests.conftest import SITE


def raw(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "mode": "dev",
        "registry": "registry",
        "data_dir": "data",
        "tls": {
            "cert": "c.crt",
            "key": "c.key",
            "client_ca": "ca.crt",
            "node_ca": "node.crt",
            "node_client_cert": "nc.crt",
            "node_client_key": "nc.key",
        },
        "state": {"redis_url": "rediss://gw@redis.internal:6380/0"},
        "policy": {"bundle": "bundle.json", "officer_keys": ["officer.pub"]},
        "receipts": {"signing_key": "receipt.key", "log_key": "log.key"},
        "jobs": {"key_file": "jobs.key"},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged = {**base[key], **value}
            base[key] = {k: v for k, v in merged.items() if v is not None}
        else:
            base[key] = value
    return base


def test_paths_resolve_against_the_config_dir() -> None:
    cfg = parse_config(raw(), Path("/etc/ztgate"))
    assert cfg.tls.cert == Path("/etc/ztgate/c.crt")
    assert cfg.registry == Path("/etc/ztgate/registry")
    assert cfg.routing.max_attempts == 3


@pytest.mark.parametrize(
    "bad, message",
    [
        (raw(mode="staging"), "mode"),
        (raw(routing={"max_attempts": 0}), "max_attempts"),
        (raw(routing={"eject_base_s": 10, "eject_max_s": 1}), "eject_base_s"),
        (raw(receipts={"log_key": None}), "both"),
        (raw(receipts={"log_key": "receipt.key"}), "differ"),
        (raw(policy={"dir": "p"}), "either dir"),
        (raw(policy={"default_rate": "lots"}), "default_rate"),
        (raw(routing={"deadline_s": "ten"}), "deadline_s"),
        (raw(listen={"port": True}), "port"),
        (raw(tls={"cert": 5}), "cert"),
        (raw(surprise=1), "unknown"),
        (raw(nodes=[{"name": "a"}]), "nodes[0]"),
        (raw(nodes="n1"), "nodes"),
        ({k: v for k, v in raw().items() if k != "tls"}, "tls"),
        (raw(receipts={"retention": {"body_days": -1}}), "retention.body_days"),
        (raw(receipts={"retention": {"body_days": 0}}), "retention.body_days"),
        (raw(receipts={"retention": {"body_days": float("nan")}}), "retention.body_days"),
        (raw(receipts={"retention": {"body_days": float("inf")}}), "retention.body_days"),
        (raw(receipts={"retention": {"body_days": "90d"}}), "retention.body_days"),
        (raw(receipts={"retention": {"body_days": True}}), "retention.body_days"),
        (raw(receipts={"retention": {"check_interval_s": 0}}), "check_interval_s"),
        (raw(receipts={"retention": {"check_interval_s": 1e9}}), "check_interval_s"),
        (raw(receipts={"retention": {"max_per_pass": 0}}), "max_per_pass"),
        (raw(receipts={"retention": {"max_per_pass": 10**7}}), "max_per_pass"),
        (raw(receipts={"retention": {"max_per_pass": 1.5}}), "max_per_pass"),
        (
            raw(receipts={"retention": {"checkpoint_history_keep_every_s": -5}}),
            "checkpoint_history_keep_every_s",
        ),
        (
            raw(receipts={"retention": {"checkpoint_history_keep_every_s": 0.001}}),
            "checkpoint_history_keep_every_s",
        ),
        (
            raw(receipts={"retention": {"checkpoint_history_keep_latest": 0}}),
            "checkpoint_history_keep_latest",
        ),
        (raw(receipts={"retention": {"bodies_days": 90}}), "receipts.retention] unknown"),
        (raw(receipts={"retention": 90}), "receipts.retention] must be a table"),
        (raw(logging={"decisions": "syslog"}), "logging.decisions"),
        (raw(logging={"decisions": "file:"}), "logging.decisions"),
        (raw(logging={"decisions": "file:d.jsonl", "decisions_max_bytes": 100}), "max_bytes"),
        (raw(logging={"decisions": "file:d.jsonl", "decisions_backups": 0}), "backups"),
        (raw(logging={"decisions": "file:d.jsonl", "decisions_backups": -1}), "backups"),
        (raw(logging={"decisions": "file:d.jsonl", "decisions_max_bytes": "1MB"}), "max_bytes"),
        (raw(logging={"rotate": True}), "logging] unknown"),
    ],
)
def test_invalid_config_names_the_key(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(bad, Path("/"))


def test_retention_and_decision_log_settings_parse() -> None:
    defaults = parse_config(raw(), Path("/etc/ztgate"))
    r = defaults.receipts.retention
    assert r.body_days is None  # bodies are kept unless an age is configured
    assert (r.check_interval_s, r.max_per_pass) == (3600.0, 250)
    assert (r.checkpoint_history_keep_every_s, r.checkpoint_history_keep_latest) == (0.0, 64)
    assert not r.enabled  # so by default the gateway runs no retention job at all
    assert defaults.logging.decisions == "stderr" and defaults.logging.decisions_file is None
    cfg = parse_config(
        raw(
            receipts={
                "retention": {
                    "body_days": 90,
                    "check_interval_s": 600,
                    "max_per_pass": 500,
                    "checkpoint_history_keep_every_s": 3600,
                }
            },
            logging={
                "decisions": "file:log/decisions.jsonl",
                "decisions_max_bytes": 1 << 20,
                "decisions_backups": 3,
            },
        ),
        Path("/etc/ztgate"),
    )
    r = cfg.receipts.retention
    assert (r.body_days, r.check_interval_s, r.max_per_pass) == (90.0, 600.0, 500)
    assert isinstance(r.body_days, float) and r.checkpoint_history_keep_every_s == 3600.0
    assert cfg.receipts.signing_key == Path("/etc/ztgate/receipt.key")  # the rest intact
    assert cfg.logging.decisions_file == Path("/etc/ztgate/log/decisions.jsonl")
    assert (cfg.logging.decisions_max_bytes, cfg.logging.decisions_backups) == (1 << 20, 3)
    # fractional days are fine (hours): only zero, negative and non-finite ages are not
    assert (
        parse_config(
            raw(receipts={"retention": {"body_days": 0.5}}), Path("/")
        ).receipts.retention.body_days
        == 0.5
    )


def test_retention_and_logging_keys_are_documented() -> None:
    import dataclasses

    from gateway.config import Logging, Retention

    doc = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    for section, cls in (("[receipts.retention]", Retention), ("[logging]", Logging)):
        block = doc.split(section, 1)[1].split("\n[", 1)[0]
        for f in dataclasses.fields(cls):
            assert re.search(rf"^{f.name} = ", block, re.M), f"{section} {f.name} undocumented"


@pytest.mark.parametrize(
    "over, item",
    [
        ({"tls": {"dev_pki": True}}, "dev_pki"),
        ({"state": {"redis_url": None}}, "redis_url unset"),
        ({"state": {"redis_url": "redis://127.0.0.1:6379/0"}}, "plaintext"),
        ({"policy": {"bundle": None, "dir": "policies"}}, "unsigned policy directory"),
        ({"policy": {"officer_keys": []}}, "without policy.officer_keys"),
        ({"receipts": {"signing_key": None, "log_key": None}}, "receipts disabled"),
        ({"jobs": {"key_file": None}}, "without jobs.key_file"),
    ],
)
def test_production_refuses_each_dev_only_item(
    over: dict[str, Any], item: str, caplog: pytest.LogCaptureFixture
) -> None:
    prod = parse_config(raw(mode="production", **over), Path("/"))
    [only] = prod.dev_only_items()  # on its own: the clean config plus this one item
    assert item in only
    with pytest.raises(ProductionRefused, match=re.escape(only)):
        check_mode(prod)
    # The same item in dev mode is allowed, with a warning naming it.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.runtime"):
        check_mode(parse_config(raw(mode="dev", **over), Path("/")))
    assert [r.getMessage() for r in caplog.records] == [f"DEV-ONLY in use: {only}"]


def test_production_accepts_a_clean_config() -> None:
    """The positive control of the test above: no dev-only item, nothing refused."""
    prod = parse_config(raw(mode="production"), Path("/"))
    assert prod.dev_only_items() == []
    check_mode(prod)


def test_cli_reports_bad_config_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "gw.toml"
    bad.write_text("mode = [unclosed\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    with pytest.raises(ConfigError):
        load_config(bad)


# ---------------------------------------------------------------- production asks the files


def _own_ca(tmp: Path) -> Path:
    """A CA certificate of the operator's own PKI (not the dev one): the positive control."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "Example Corp Root"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Corp"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp / "own-ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_production_detects_the_dev_pki_from_the_certificates(pki: PKI, tmp_path: Path) -> None:
    """Leaving out `tls.dev_pki` does not pass the dev PKI off as production: the files say
    where they come from, by their issuer and, copied elsewhere, by their names."""
    server_cert = pki.leaf_paths("gateway-server", SITE, SITE)[0]
    dev_tls = {
        "cert": str(server_cert),
        "client_ca": str(pki.client_ca_bundle()),
        "node_ca": str(pki.node_ca_bundle()),
        "node_client_cert": str(pki.leaf_paths("gateway-node-client", SITE, SITE)[0]),
    }
    prod = parse_config(raw(mode="production", tls=dev_tls), Path("/"))
    [only] = prod.dev_only_items()
    assert "issued by the development PKI" in only
    for name in ("tls.cert", "tls.client_ca", "tls.node_ca", "tls.node_client_cert"):
        assert name in only
    with pytest.raises(ProductionRefused, match="from your own CA") as refused:
        check_mode(prod)
    assert 'mode = "dev"' not in str(refused.value)
    # Copied out of the PKI directory, the issuer still names it.
    copy = tmp_path / "server.crt"
    copy.write_bytes(server_cert.read_bytes())
    moved = parse_config(raw(mode="production", tls={"cert": str(copy)}), Path("/"))
    assert any("tls.cert" in item for item in moved.dev_only_items())
    # Control: the operator's own CA in every slot passes.
    own = str(_own_ca(tmp_path))
    clean = {k: own for k in dev_tls}
    assert parse_config(raw(mode="production", tls=clean), Path("/")).dev_only_items() == []


@pytest.mark.parametrize(
    "query, weak",
    [
        ("ssl_cert_reqs=none", "ssl_cert_reqs=none"),
        ("ssl_cert_reqs=optional", "ssl_cert_reqs=optional"),
        ("ssl_check_hostname=false", "ssl_check_hostname=false"),
        ("ssl_ca_certs=/etc/ca.crt&SSL_CERT_REQS=None", "SSL_CERT_REQS=None"),
    ],
)
def test_production_refuses_redis_urls_that_turn_tls_checks_off(query: str, weak: str) -> None:
    url = f"rediss://gw@redis.internal:6380/0?{query}"
    [only] = parse_config(
        raw(mode="production", state={"redis_url": url}), Path("/")
    ).dev_only_items()
    assert "turns TLS checks off" in only and weak in only
    # Control: the same URL asking for the checks explicitly is fine.
    strict = "rediss://gw@redis.internal:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.crt"
    cfg = parse_config(raw(mode="production", state={"redis_url": strict}), Path("/"))
    assert cfg.dev_only_items() == []
