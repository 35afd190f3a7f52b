"""`ztgate node serve --cert/--key/--gateway-ca`: a node on the customer's own PKI.

The positive control is the system cluster itself: its three nodes run with exactly these
flags (tests/system/cluster.py) and answer in every scenario. Here, what is refused
before any tritonserver starts, each with the reason printed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from tests.system.customer_pki import CustomerPKI

pytestmark = pytest.mark.system
END = "-----END CERTIFICATE-----\n"


@pytest.fixture(scope="module")
def customer(tmp_path_factory: pytest.TempPathFactory) -> CustomerPKI:
    return CustomerPKI(tmp_path_factory.mktemp("customer-pki"), "acme.example", "eu1")


def serve(tmp: Path, *flags: str) -> list[str]:
    return [
        "node", "serve", "--name", "n9", "--region", "eu-west", "--provider", "prov-z",
        "--grpc-port", "1", "--registry", str(tmp / "no-registry"),
        "--workdir", str(tmp / "n9"), *flags,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["pki-and-cert", "no-gateway-ca", "wrong-key", "leaf-as-gateway-ca", "client-cert"],
)
def test_node_serve_refuses_unusable_own_pki_files(
    customer: CustomerPKI, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    node, other = customer.node("n9"), customer.node("n8")
    client = customer.client("someone")
    good = ["--cert", str(node.cert), "--key", str(node.key)]
    leaf_only = tmp_path / "leaf-only.crt"  # the node cert file minus its issuing CA
    leaf_only.write_text(other.cert.read_text().split("-----END CERTIFICATE-----")[0] + END)
    ca = ["--gateway-ca", str(customer.ca("gateway"))]
    argv, expected = {
        "pki-and-cert": ([*good, *ca, "--pki", str(tmp_path)], "exclude each other"),
        "no-gateway-ca": (good, "missing --gateway-ca"),
        "wrong-key": (["--cert", str(node.cert), "--key", str(other.key), *ca], "is not the key"),
        "leaf-as-gateway-ca": ([*good, "--gateway-ca", str(leaf_only)], "no CA certificate"),
        "client-cert": (
            ["--cert", str(client.cert), "--key", str(client.key), *ca],
            "lacks the serverAuth",
        ),
    }[case]
    assert main(serve(tmp_path, *argv)) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not (tmp_path / "n9").exists(), "refused before anything was built"
