"""deploy/ as shipped: every Kustomize overlay renders and validates, the production
overlay's gateway.toml passes `ztgate serve --check`, the container files and systemd
units meet their written checklists."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.jobs.seal import load_key

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
OVERLAYS = ["base", "overlays/dev", "overlays/production"]
ZTGATE = [sys.executable, "-m", "gateway"]

sys.path.insert(0, str(KUBE))
import render  # noqa: E402  (deploy/kubernetes/render.py: kustomize without kubectl)

sys.path.remove(str(KUBE))


def _tool(name: str) -> str | None:
    """A tool from this venv or PATH; in CI a missing one fails instead of skipping."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None and os.environ.get("CI"):
        pytest.fail(f"{name} is not installed (CI must have it: see deploy/README.md)")
    return found


def rendered(overlay: str) -> list[dict[str, Any]]:
    return render.render(KUBE / overlay)


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [obj] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def _by_key(objects: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {render._key(o): o for o in objects}


# --- Kubernetes ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_the_same_with_kubectl_and_the_python_renderer(
    overlay: str,
) -> None:
    mine = _by_key(rendered(overlay))
    assert ("StatefulSet", "ztgate", "ztgate-gateway") in mine
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the Python renderer alone was checked")
    out = subprocess.run(
        [kubectl, "kustomize", str(KUBE / overlay)], capture_output=True, text=True, check=True
    ).stdout
    assert _by_key([o for o in yaml.safe_load_all(out) if o]) == mine


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_validates_strictly(overlay: str, tmp_path: Path) -> None:
    tool = _tool("kubernetes-validate")
    if tool is None:
        pytest.skip("kubernetes-validate not installed (pip install '.[dev]')")
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all(rendered(overlay)))
    done = subprocess.run([tool, "--strict", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" in done.stdout and "failed" not in done.stdout


# Only development images may go by tag; production pins every image by digest.
CHECKOV_ALLOWED = {"base": {"CKV_K8S_43"}, "overlays/dev": {"CKV_K8S_43"}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_finds_nothing_but_dev_image_tags(overlay: str, tmp_path: Path) -> None:
    # checkov pins packaging<24, which pytest 9 cannot share a venv with: install it with
    # pipx (or in its own venv) and put it on PATH, or name it in $CHECKOV.
    tool = os.environ.get("CHECKOV") or _tool("checkov")
    if tool is None:
        pytest.skip("checkov not installed (pipx install checkov)")
    (tmp_path / "all.yaml").write_text(yaml.safe_dump_all(rendered(overlay)))
    done = subprocess.run(
        [tool, "-d", str(tmp_path), "--framework", "kubernetes", "-o", "json", "--quiet"],
        capture_output=True,
        text=True,
    )
    report = json.loads(done.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = {(f["check_id"], f["resource"]) for f in report["results"]["failed_checks"]}
    allowed = CHECKOV_ALLOWED.get(overlay, set())
    assert {f for f in failed if f[0] not in allowed} == set()
    assert report["summary"]["passed"] > 200  # it did look at the manifests


def test_gateway_is_a_hardened_statefulset_with_a_volume_per_replica() -> None:
    for overlay in OVERLAYS:
        objects = rendered(overlay)
        sts = find(objects, "StatefulSet", "ztgate-gateway")
        spec = sts["spec"]
        pod = spec["template"]["spec"]
        [claim] = spec["volumeClaimTemplates"]
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        headless = find(objects, "Service", spec["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"
        assert pod["securityContext"]["runAsNonRoot"] is True
        [gw] = pod["containers"]
        assert gw["securityContext"]["readOnlyRootFilesystem"] is True
        assert gw["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"]: m["name"] for m in gw["volumeMounts"]}
        assert mounts["/var/lib/ztgate/data"] == claim["metadata"]["name"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert claim["metadata"]["name"] not in volumes  # not one shared PVC
        for probe, path in (
            ("startupProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
        ):
            assert gw[probe]["httpGet"] == {"path": path, "port": "admin"}
        ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
        assert gw["resources"]["requests"] and gw["resources"]["limits"]
        assert find(objects, "PodDisruptionBudget", "ztgate-gateway")
        assert pod["affinity"]["podAntiAffinity"] if overlay != "overlays/dev" else True
        # The public Service carries the API only, never the unauthenticated admin port.
        public = find(objects, "Service", "ztgate")
        assert [p["targetPort"] for p in public["spec"]["ports"]] == ["api"]
        assert ports["admin"] == 8081
        # No Secret is mounted into the environment (checkov CKV_K8S_35 too).
        for c in pod["containers"] + pod["initContainers"]:
            assert all(
                "valueFrom" not in e or "fieldRef" in e["valueFrom"] for e in c.get("env", [])
            )
        assert all(c["securityContext"]["readOnlyRootFilesystem"] for c in pod["initContainers"])
    prod = find(rendered("overlays/production"), "StatefulSet", "ztgate-gateway")
    assert prod["spec"]["replicas"] == 3
    assert prod["spec"]["template"]["spec"]["topologySpreadConstraints"]


def test_redis_has_service_pvc_probes_tls_and_an_acl_password() -> None:
    objects = rendered("overlays/production")
    sts = find(objects, "StatefulSet", "redis")
    [c] = sts["spec"]["template"]["spec"]["containers"]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c)
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    svc = find(objects, "Service", "redis")
    assert [p["port"] for p in svc["spec"]["ports"]] == [6380]
    conf = find(objects, "ConfigMap", "redis")["data"]["redis.conf"]
    assert re.search(r"^port 0$", conf, re.M) and re.search(r"^tls-port 6380$", conf, re.M)
    assert re.search(r"^aclfile ", conf, re.M)
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["acl"]["secret"]["secretName"] == "redis-acl"
    toml = tomllib.loads(gateway_toml(objects))
    assert toml["state"]["redis_url"].startswith("rediss://ztgate:${REDIS_PASSWORD}@redis.")


def _policy(objects: list[dict[str, Any]], name: str, ns: str) -> dict[str, Any]:
    [p] = [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy"
        and o["metadata"]["name"] == name
        and o["metadata"]["namespace"] == ns
    ]
    return p["spec"]


def _ports(rules: list[dict[str, Any]]) -> set[int]:
    return {p["port"] for r in rules for p in r.get("ports", [])}


def test_network_policies_follow_the_trust_boundaries() -> None:
    """SECURITY.md: nodes are untrusted, the admin port has no auth, the network is
    hostile. Each namespace denies by default; only the listed flows are open."""
    objects = rendered("overlays/production")
    for ns in ("ztgate", "ztgate-nodes"):
        deny = _policy(objects, "default-deny", ns)
        assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    gw = _policy(objects, "ztgate-gateway", "ztgate")
    [admin] = [r for r in gw["ingress"] if _ports([r]) == {8081}]
    assert admin["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    # Redis: only the gateway, and it talks to nobody.
    redis = _policy(objects, "redis", "ztgate")
    [rule] = redis["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app": "ztgate-gateway"}}}]
    assert redis["egress"] == []
    # Nodes: reach neither Redis nor the gateway's API or admin port, nor the outside.
    node = _policy(objects, "triton-node", "ztgate-nodes")
    assert _ports(node["egress"]) == {9100, 9200, 53}
    assert not any("ipBlock" in peer for r in node["egress"] for peer in r["to"])
    gateway_api_from_nodes = [
        r for r in gw["ingress"] if r.get("from") and {8443, 8081} & _ports([r])
    ]
    assert all("ztgate-nodes" not in json.dumps(r) for r in gateway_api_from_nodes)
    for r in node["ingress"]:
        assert 8000 not in _ports([r])  # Triton's HTTP stays on loopback


def test_cert_manager_example_has_one_issuer_per_role() -> None:
    docs = [d for d in yaml.safe_load_all((KUBE / "cert-manager.yaml").read_text()) if d]
    issuers = [d for d in docs if d["kind"] == "Issuer"]
    secrets = {d["spec"]["ca"]["secretName"] for d in issuers}
    assert len(secrets) == len(issuers) >= 3  # client, node, gateway per site: no sharing
    for cert in (d for d in docs if d["kind"] == "Certificate"):
        assert cert["spec"]["issuerRef"]["name"] in {i["metadata"]["name"] for i in issuers}


def gateway_toml(objects: list[dict[str, Any]]) -> str:
    text: str = find(objects, "ConfigMap", "ztgate-gateway")["data"]["gateway.toml"]
    return text


def _free_port() -> int:
    from gateway.ports import free_port

    return free_port()


def _as_mounted(overlay: str, tmp: Path) -> tuple[Path, dict[str, Any]]:
    """The overlay's gateway.toml as the init container renders it for replica 0, every
    mount path moved under `tmp` and filled with test-made files of a customer PKI (not
    the development PKI, which production refuses)."""
    from tests.system.customer_pki import CustomerPKI

    objects = rendered(overlay)
    sts = find(objects, "StatefulSet", "ztgate-gateway")
    [gw] = sts["spec"]["template"]["spec"]["containers"]
    mounts = sorted((m["mountPath"] for m in gw["volumeMounts"]), key=len, reverse=True)
    text = gateway_toml(objects)
    text = text.replace("${POD_NAME}", "ztgate-gateway-0").replace("${REDIS_PASSWORD}", "0f" * 16)
    assert "${" not in text
    raw = tomllib.loads(text)
    # Every file the config names lies under a volume the StatefulSet mounts.
    paths = re.findall(r'"(/[^"?]+)"', text) + re.findall(r"=(/[^&\"]+)", text)
    assert len(paths) >= 13
    for p in paths:
        assert any(p == m or p.startswith(m + "/") for m in mounts), f"{p} is not mounted"
    mounted = "|".join(re.escape(m) for m in mounts)  # longest first
    text = re.sub(rf'(["=])({mounted})(?=[/"])', lambda g: f"{g[1]}{tmp}{g[2]}", text)
    # Ports are the host's: a test cannot rely on 8443 being free.
    text = re.sub(r"^port = \d+", f"port = {_free_port()}", text, flags=re.M)
    text = re.sub(r"^admin_port = \d+", f"admin_port = {_free_port()}", text, flags=re.M)
    text = text.replace('host = "0.0.0.0"', 'host = "127.0.0.1"')
    text = text.replace('admin_host = "0.0.0.0"', 'admin_host = "127.0.0.1"')

    def at(p: str) -> Path:
        dest = Path(f"{tmp}{p}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest

    pki = CustomerPKI(tmp / "officer-pki", raw["trust_domain"], raw["site"])
    tls, state = raw["tls"], raw["state"]
    server, node_client = pki.gateway_server(), pki.gateway_node_client()
    for key, src in (
        ("cert", server.cert),
        ("key", server.key),
        ("client_ca", pki.ca("client")),
        ("node_ca", pki.ca("node")),
        ("node_client_cert", node_client.cert),
        ("node_client_key", node_client.key),
    ):
        shutil.copy(src, at(tls[key]))
    redis_ca = re.search(r"ssl_ca_certs=([^&]+)", state["redis_url"])
    assert redis_ca is not None
    shutil.copy(pki.root_ca, at(redis_ca.group(1)))
    for key, purpose in (("signing_key", "receipt-signing"), ("log_key", "log-checkpoint")):
        shutil.copy(pki.signing_key(purpose), at(raw["receipts"][key]))
    load_key(at(raw["jobs"]["key_file"]))  # as the init container leaves it: private, 0600
    officer = pki.signing_key("officer-policy")
    [officer_pub] = raw["policy"]["officer_keys"]
    shutil.copy(officer.with_suffix(".pub"), at(officer_pub))
    registry = at(raw["registry"] + "/x").parent
    config = tmp / "gateway.toml"
    config.write_text(text)
    policies = shutil.copytree(ROOT / "policies", tmp / "policies")  # as shipped, with tests
    for args in (
        ["model", "examples", "--registry", str(registry)],
        [
            "policy", "bundle", "sign", "--policies", str(policies), "--registry",
            str(registry), "--nodes", str(config), "--key", str(officer), "--version", "1",
            "--expires-in-days", "1", "--out", str(at(raw["policy"]["bundle"])),
        ],
    ):  # fmt: skip
        done = subprocess.run([*ZTGATE, *args], capture_output=True, text=True, cwd=tmp)
        assert done.returncode == 0, done.stdout + done.stderr
    return config, raw


def _check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ZTGATE, "serve", "--config", str(config), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_the_production_overlay_config_passes_serve_check(tmp_path: Path) -> None:
    config, raw = _as_mounted("overlays/production", tmp_path)
    assert raw["mode"] == "production"
    done = _check(config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK (production mode, 1 nodes)" in done.stdout
    assert "Traceback" not in done.stderr
    # Negative control: the same mounted files, with what issue 16 found shipped (no
    # receipt keys), is refused, naming it and its fix.
    text = re.sub(r"^(signing_key|log_key) = .*$", "", config.read_text(), flags=re.M)
    bad = tmp_path / "no-receipts.toml"
    bad.write_text(text)
    refused = _check(bad)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "receipts disabled" in refused.stderr and "set receipts.signing_key" in refused.stderr
    assert "Traceback" not in refused.stderr


# --- Container files -----------------------------------------------------------------------

CONTAINERFILES = ["Containerfile.gateway", "Containerfile.node"]
SECRET_NAMES = re.compile(r"(\.key|\.pem|\.crt|\.p12|\.pfx|id_rsa|password|secret|token)", re.I)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", CONTAINERFILES)
def test_containerfile_meets_the_checklist(name: str) -> None:
    """deploy/README.md, "Images": base pinned by digest, a non-root USER last, nothing
    secret copied in or put in ENV/ARG, a HEALTHCHECK, no ADD of remote URLs."""
    steps = _instructions(DEPLOY / name)
    args = {
        k: v
        for word, rest in steps
        if word == "ARG" and "=" in rest
        for k, v in [rest.split("=", 1)]
    }
    froms = [rest.split()[0] for word, rest in steps if word == "FROM"]
    assert froms
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if image in {r.split()[-1] for w, r in steps if w == "FROM" and " AS " in r.upper()}:
            continue  # a stage of this file
        assert re.search(r"@sha256:[0-9a-f]{64}$", image), f"{image} is not pinned by digest"
    users = [rest for word, rest in steps if word == "USER"]
    assert users, "no USER"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    last_from = max(i for i, (w, _) in enumerate(steps) if w == "FROM")
    assert any(w == "USER" for w, _ in steps[last_from:]), "final stage runs as root"
    for word, rest in steps:
        if word in ("COPY", "ADD"):
            assert not SECRET_NAMES.search(rest), f"{word} {rest}"
            assert not re.search(r"https?://", rest), f"{word} fetches a URL"
        if word in ("ENV", "ARG"):
            assert not SECRET_NAMES.search(rest.split("=")[0]), f"{word} {rest}"
    assert any(w == "HEALTHCHECK" for w, _ in steps)
    assert "nvcr.io/nvidia/tritonserver" in (DEPLOY / name).read_text() or name.endswith("gateway")


def test_the_build_context_copies_only_source() -> None:
    # What the COPY lines take: no directory where keys or a dev PKI live.
    for name in CONTAINERFILES:
        for word, rest in _instructions(DEPLOY / name):
            if word == "COPY" and "--from" not in rest:
                for src in rest.split()[:-1]:
                    assert (ROOT / src).exists() and not src.startswith(".ztgate"), src


# --- systemd -------------------------------------------------------------------------------

UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "PrivateTmp": "yes",
    "ProtectHome": "yes",
    "CapabilityBoundingSet": "",
    "RestrictSUIDSGID": "yes",
}


def _unit(path: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


@pytest.mark.parametrize("name", ["ztgate-gateway.service", "ztgate-node.service"])
def test_systemd_units_are_hardened(name: str) -> None:
    unit = _unit(DEPLOY / "systemd" / name)
    for key, want in HARDENING.items():
        assert unit.get(key) == [want], f"{name}: {key}"
    assert unit["User"][0].startswith("ztgate") and unit["User"][0] != "root"
    assert unit["StateDirectory"]
    # Writable: its own state (and logs) only.
    rw = " ".join(unit.get("ReadWritePaths", [])).split()
    assert all(p.startswith(("/var/lib/ztgate", "/var/log/ztgate")) for p in rw), rw
    assert "--check" in " ".join(unit.get("ExecStartPre", [])) or name != "ztgate-gateway.service"


def test_systemd_analyze_verify_accepts_every_unit(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze missing in CI (apt-get install systemd)")
        pytest.skip("systemd-analyze not installed")
    ztgate = Path(sys.executable).with_name("ztgate")
    units = []
    for path in sorted((DEPLOY / "systemd").iterdir()):
        # The units name the installed /opt/ztgate; verify checks that it is executable.
        dest = tmp_path / path.name
        dest.write_text(path.read_text().replace("/opt/ztgate/bin/ztgate", str(ztgate)))
        units.append(str(dest))
    done = subprocess.run(
        [tool, "verify", "--man=no", *units], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if "ztgate" in line] == []


# --- ztgate serve --check, ztgate --version -------------------------------------------------


def test_version() -> None:
    done = subprocess.run([*ZTGATE, "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and re.fullmatch(r"ztgate \S+\n", done.stdout), done


@pytest.mark.slow
def test_check_reports_every_problem_at_once_one_line_each_without_a_traceback(
    tmp_path: Path,
) -> None:
    import socket

    config, _raw = _as_mounted("overlays/production", tmp_path)
    text = config.read_text()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        text = re.sub(r"^port = \d+", f"port = {busy}", text, flags=re.M)
        text = re.sub(r"rediss://[^\"]+", "rediss://ztgate:pw@redis.internal:notaport/0", text)
        text = text.replace('address = "triton-node-0', 'address = "triton node 0')
        keys = tmp_path / "etc/ztgate/keys"
        (keys / "log-checkpoint.key").unlink()
        (keys / "receipt-signing.key").chmod(0)
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        done = _check(bad)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("ztgate: error:")]
    keys_named = " ".join(errors)
    for expected in (
        f"listen.port: port {busy} on 127.0.0.1 is in use",
        "receipts.log_key:",
        "does not exist",
        "state.redis_url: cannot be parsed",
        "nodes[0] (gpu-a1).address",
    ):
        assert expected in keys_named, (expected, done.stderr)
    if os.geteuid() != 0:  # root reads any file
        assert "receipts.signing_key:" in keys_named and "not readable" in keys_named
    assert all("; fix: " in line for line in errors)
    assert f"{len(errors)} problem(s)" in done.stderr


def test_check_fix_is_right_for_the_mode(tmp_path: Path) -> None:
    """Production names each dev-only item with its fix; dev mode starts the same file."""
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        'mode = "production"\nregistry = "."\ndata_dir = "data"\n'
        "[listen]\nport = 0\nadmin_port = 0\n"
        '[tls]\ncert = "x"\nkey = "x"\nclient_ca = "x"\nnode_ca = "x"\n'
        'node_client_cert = "x"\nnode_client_key = "x"\n'
        '[policy]\ndir = "."\n'
    )
    (tmp_path / "x").write_text("")
    done = _check(cfg)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "state.redis_url unset" in done.stderr and "set it to a rediss:// URL" in done.stderr
    assert "receipts disabled" in done.stderr and "policy.dir: an unsigned" in done.stderr
    assert "listen.port: 0 is not a TCP port" in done.stderr


# --- configuration reference ----------------------------------------------------------------


def test_config_reference_matches_the_code() -> None:
    from gateway import configref
    from gateway.config import parse_config

    doc = configref.DOC.read_text()
    assert configref.replace_in(doc) == doc, "run: python -m gateway.configref --write"
    keys = {k for k, *_ in configref.rows()}
    # Every production rule names a real key, and every dev-only item production refuses
    # starts with a key the table gives a rule for.
    assert set(configref.PRODUCTION) <= keys
    raw: dict[str, Any] = {
        "registry": "r",
        "data_dir": "d",
        "tls": {k: "x" for k in ("cert", "key", "client_ca", "node_ca")}
        | {"node_client_cert": "x", "node_client_key": "x", "dev_pki": True},
        "state": {"redis_url": "redis://h:1/0"},
        "policy": {"dir": "p"},
    }
    items = parse_config(raw, Path("/nonexistent")).dev_only_items()
    assert len(items) >= 4
    for item in items:
        key = re.split(r"[: ]", item, maxsplit=1)[0]
        assert key in configref.PRODUCTION or key == "receipts", item
