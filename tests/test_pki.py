"""The dev PKI: one CA per role, SPIFFE IDs, EKUs, key permissions, CLI errors."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.cli import main
from gateway.pki import PKI, SIGNING_KEYS, PKIError, load_signing_key, signing_key_id


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.init(tmp_path_factory.mktemp("pki"), "example.test", ["site-a", "site-b"])


CLIENT = "spiffe://example.test/client/"


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _ekus(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_each_role_has_its_own_issuer(pki: PKI) -> None:
    client = _cert(pki.issue("client", "alice").cert)
    node = _cert(pki.issue("node", "n1").cert)
    gw_a = _cert(pki.leaf_paths("gateway-node-client", "site-a", "site-a")[0])
    gw_b = _cert(pki.leaf_paths("gateway-node-client", "site-b", "site-b")[0])
    issuers = {c.issuer for c in (client, node, gw_a, gw_b)}
    assert len(issuers) == 4
    assert client.issuer == _cert(pki.client_ca_bundle()).subject
    assert node.issuer == _cert(pki.node_ca_bundle()).subject
    assert gw_a.issuer == _cert(pki.gateway_ca_bundle("site-a")).subject
    assert gw_b.issuer == _cert(pki.gateway_ca_bundle("site-b")).subject


def test_spiffe_ids_ekus_and_node_dns(pki: PKI) -> None:
    client = _cert(pki.issue("client", "bob", organization="Acme", unit="risk").cert)
    assert _uris(client) == ["spiffe://example.test/client/bob"]
    assert _ekus(client) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    node = _cert(pki.issue("node", "n2").cert)
    assert _uris(node) == ["spiffe://example.test/node/n2"]
    assert _ekus(node) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["n2.node.example.test"]
    server = _cert(pki.leaf_paths("gateway-server", "site-a", "site-a")[0])
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert _ekus(server) == {ExtendedKeyUsageOID.SERVER_AUTH}
    dealer = _cert(pki.leaf_paths("dealer", "dealer", "site-a")[0])
    assert _uris(dealer) == ["spiffe://example.test/gateway/dealer"]


def test_keys_are_private_and_distinct(pki: PKI) -> None:
    ids = set()
    for purpose in (*SIGNING_KEYS, "edge-gateway-site-a", "edge-gateway-site-b"):
        path = pki.key_path(purpose)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        ids.add(signing_key_id(load_signing_key(path).public_key()))
    assert len(ids) == len(SIGNING_KEYS) + 2
    for key in pki.root.rglob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_client_ca_store_rejects_a_node_cert(pki: PKI) -> None:
    """The gateway's trust store (client CA only) verifies clients and nothing else."""
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    client_ca = _cert(pki.client_ca_bundle())
    verifier = PolicyBuilder().store(Store([client_ca])).build_client_verifier()
    # Positive control, the same verifier: a client leaf chains to the client CA.
    good = _cert(pki.issue("client", "carol").cert)
    verified = verifier.verify(good, [])
    assert verified.chain == [good, client_ca]
    assert verified.subjects == [x509.UniformResourceIdentifier(CLIENT + "carol")]
    # A node leaf (it has the client-auth EKU too), even with its own CA offered beside it.
    node = _cert(pki.issue("node", "n3").cert)
    assert ExtendedKeyUsageOID.CLIENT_AUTH in _ekus(node)
    with pytest.raises(VerificationError, match="candidates exhausted"):
        verifier.verify(node, [_cert(pki.node_ca_bundle())])


def test_ssl_context_loads_every_pair(pki: PKI) -> None:
    for role, name, site in (
        ("gateway-server", "site-a", "site-a"),
        ("gateway-node-client", "site-b", "site-b"),
        ("dealer", "dealer", "site-a"),
    ):
        cert, key = pki.leaf_paths(role, name, site)  # type: ignore[arg-type]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
    # ... which would refuse a certificate with another role's key
    cert, _ = pki.leaf_paths("gateway-server", "site-a", "site-a")
    _, other_key = pki.leaf_paths("dealer", "dealer", "site-a")
    with pytest.raises(ssl.SSLError, match="KEY_VALUES_MISMATCH"):
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, other_key)


def test_init_is_idempotent_and_refuses_other_trust_domain(pki: PKI) -> None:
    before = pki.root_ca.read_bytes()
    again = PKI.init(pki.root, "example.test", ["site-a"])
    assert again.root_ca.read_bytes() == before
    assert again.sites == ["site-a", "site-b"]
    with pytest.raises(PKIError, match="trust domain"):
        PKI.init(pki.root, "other.test")


def test_expired_issue_and_bad_names(pki: PKI) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    old = pki.issue("client", "old", not_before=past, not_after=past + dt.timedelta(days=1))
    assert _cert(old.cert).not_valid_after_utc < dt.datetime.now(dt.UTC)
    for bad in ("", "UPPER", "a/b", "x" * 64, "../etc", "alice\n", "-lead"):
        with pytest.raises(PKIError, match="invalid name"):
            pki.issue("client", bad)
    # Positive control: the longest and the shortest good names, issued the same way.
    for good in ("x" * 63, "0", "a-b"):
        assert _uris(_cert(pki.issue("client", good).cert)) == [CLIENT + good]
    with pytest.raises(PKIError, match="invalid trust domain"):
        PKI.init(pki.root.parent / "td", "example.test\n")
    with pytest.raises(PKIError, match="site"):
        pki.issue("gateway-server", "x", site="nowhere")


def test_cli_init_issue_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "p"
    assert main(["pki", "init", str(d)]) == 0
    assert main(["pki", "issue", "client", "dave", "--dir", str(d), "--org", "Acme"]) == 0
    assert '"spiffe_id": "spiffe://ztgate.local/client/dave"' in capsys.readouterr().out
    assert main(["pki", "issue", "client", "Bad Name", "--dir", str(d)]) == 2
    assert main(["pki", "issue", "client", "x", "--dir", str(tmp_path / "none")]) == 2
    assert main(["pki", "issue", "client", "x", "--dir", str(d), "--days", "-1"]) == 2
    assert main(["pki", "issue", "client", "x", "--dir", str(d), "--not-before", "yesterday"]) == 2
    assert "error:" in capsys.readouterr().err
