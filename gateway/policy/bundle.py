"""Signed policy bundles: the policy and every fact it decides on, under an officer's key.

A bundle packs what a decision depends on and that the gateway's own disk must not be
able to change: the Cedar files and identities.json, the facts policy reads (each model's
classification, owner, residency and allowed modes; each node's region, provider, trust
and certificate identity), the revocation staleness budget, the oldest gateway that may
load it, a version and an expiry. Without the facts in the signed payload, anyone who
can write the gateway's config could relabel a node's region or a model's classification
and get round residency or the mpc rule with the policy text untouched. For the same
reason each node's certificate identity (its DNS SAN and SPIFFE ID) is signed: the
gateway pins a node's channel to the signed DNS SAN, so gateway.toml can say where a node
is (its address) but not which certificate answers for it, and a node's signed region and
provider cannot be borrowed by another node's certificate.

File format: one JSON document, a DSSE envelope (github.com/secure-systems-lab/dsse)::

    {
      "payloadType": "application/vnd.ztgate.policy-bundle+json",
      "payload": "<base64 of the bundle as canonical JSON (RFC 8785, JCS)>",
      "signatures": [{"keyid": "<signing_key_id>", "sig": "<base64 Ed25519 signature>"}]
    }

Each signature is over DSSE's pre-authentication encoding
``PAE(type, body) = "DSSEv1 " + len(type) + " " + type + " " + len(body) + " " + body``.
Why this shape:

- The signature covers the exact payload bytes, which are verified before they are parsed:
  no second canonicalisation at verify time, so no disagreement between two JSON libraries
  about what was signed, and no parser runs on unauthenticated policy.
- PAE binds the payload type, so a signature the same key made for another purpose cannot
  be replayed as a policy bundle, and the lengths leave no ambiguity in where type ends.
- The payload is JCS, so the same bundle always gives the same bytes (re-signing is
  reproducible, and two officers can sign one payload: `signatures` is a list).
- One file, text, diffable after base64 -d; `keyid` is only a hint for picking the key.

Payload (format 2; format 1 had no node certificate identities and is refused)::

    {"format": "ztgate.policy-bundle/2", "version": 7,
     "created": "2025-01-01T00:00:00Z", "expires": "2025-01-31T00:00:00Z",
     "min_gateway_version": "0.1.0", "staleness_budget_s": 300,
     "policy": {"hash": "<PolicySource.hash>", "files": {"schema.cedarschema": "...", ...}},
     "facts": {"models": [{"name", "classification", "owner", "residency", "allowed_modes"}],
               "nodes": [{"name", "region", "provider", "trust", "dns_name", "spiffe_id"}]}}

`verify_bundle` answers with a value, never an exception, and checks in this order:
malformed envelope, unsigned, untrusted-key, bad-signature, then (on the signed payload)
malformed, not-yet-valid, expired, rollback, gateway-too-old, malformed body,
invalid-policy. The version gate comes before the body is read strictly, so a gateway
too old for a newer bundle format says exactly that (and keeps its last-known-good set)
instead of calling the bundle malformed.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import json
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway import jsonstrict
from gateway.keyid import signing_key_id
from gateway.policy import facts as F
from gateway.policy.facts import ModelFacts, NodeFacts
from gateway.policy.source import (
    IDENTITIES_FILE,
    SCHEMA_FILE,
    Finding,
    PolicyError,
    PolicySource,
    load_policy_dir,
)

if TYPE_CHECKING:
    from gateway.config import NodeConfig
    from gateway.registry import ModelEntry

PAYLOAD_TYPE = "application/vnd.ztgate.policy-bundle+json"
FORMAT = "ztgate.policy-bundle/2"
# Format 1 signed no node certificate identities: a gateway running one could not tell
# which certificate may answer for a node name, so it is refused with a way forward.
OLD_FORMATS = ("ztgate.policy-bundle/1",)
_NODE_KEYS = ("name", "region", "provider", "trust", "dns_name", "spiffe_id")
MAX_BUNDLE_BYTES = 16 * 1024 * 1024
DEFAULT_CLOCK_SKEW = dt.timedelta(minutes=5)
TRUST_LEVELS: tuple[int, ...] = (0, 1, 2)

Reason = Literal[
    "malformed",
    "unsigned",
    "untrusted-key",
    "bad-signature",
    "expired",
    "not-yet-valid",
    "rollback",
    "gateway-too-old",
    "invalid-policy",
    "too-few-signatures",
]
REASONS: tuple[Reason, ...] = (
    "malformed",
    "unsigned",
    "untrusted-key",
    "bad-signature",
    "expired",
    "not-yet-valid",
    "rollback",
    "gateway-too-old",
    "invalid-policy",
    "too-few-signatures",
)

_POLICY_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.cedar")
_VERSION_RE = re.compile(r"[0-9]+(\.[0-9]+){0,3}")
_HEADER_KEYS = frozenset(
    {"format", "version", "created", "expires", "min_gateway_version", "staleness_budget_s"}
)
_PAYLOAD_KEYS = _HEADER_KEYS | {"policy", "facts"}
# Optional: what the signing officer reviewed (goldens run, diff against the bundle in
# force), signed with the rest so a co-signer sees what the first signer saw.
_OPTIONAL_KEYS = frozenset({"review"})


class BundleFormatError(ValueError):
    """A bundle (or part of one) that is not in the format above; the message says where."""


# --------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class BundleFacts:
    """The facts policy decides on, as signed: models and nodes, each sorted by name."""

    models: tuple[ModelFacts, ...] = ()
    nodes: tuple[NodeFacts, ...] = ()

    def model(self, name: str) -> ModelFacts | None:
        return next((m for m in self.models if m.name == name), None)

    def node(self, name: str) -> NodeFacts | None:
        return next((n for n in self.nodes if n.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "models": [
                {
                    "name": m.name,
                    "classification": m.classification,
                    "owner": m.owner,
                    "residency": sorted(m.residency),
                    "allowed_modes": [x for x in F.MODES if x in m.allowed_modes],
                }
                for m in sorted(self.models, key=lambda m: m.name)
            ],
            "nodes": [
                {
                    "name": n.name,
                    "region": n.region,
                    "provider": n.provider,
                    "trust": n.trust,
                    "dns_name": n.dns_name,
                    "spiffe_id": n.spiffe_id,
                    # Only when set: bundles signed before sites existed stay byte-identical.
                    **({"site": n.site} if n.site else {}),
                }
                for n in sorted(self.nodes, key=lambda n: n.name)
            ],
        }

    @classmethod
    def from_json(cls, raw: Any) -> BundleFacts:
        """Structure only (types, exact keys); `problems` judges the values."""
        obj = _object(raw, "facts", ("models", "nodes"))
        models = []
        for i, item in enumerate(_list(obj, "models", "facts")):
            where = f"facts.models[{i}]"
            m = _object(
                item, where, ("name", "classification", "owner", "residency", "allowed_modes")
            )
            models.append(
                ModelFacts(
                    name=_str(m, "name", where),
                    classification=_str(m, "classification", where),
                    owner=_str(m, "owner", where),
                    residency=_strs(m, "residency", where),
                    allowed_modes=_strs(m, "allowed_modes", where),
                )
            )
        nodes = []
        for i, item in enumerate(_list(obj, "nodes", "facts")):
            where = f"facts.nodes[{i}]"
            keys = (*_NODE_KEYS, "site") if isinstance(item, dict) and "site" in item else None
            n = _object(item, where, keys or _NODE_KEYS)
            nodes.append(
                NodeFacts(
                    name=_str(n, "name", where),
                    region=_str(n, "region", where),
                    provider=_str(n, "provider", where),
                    trust=_int(n, "trust", where),
                    dns_name=_str(n, "dns_name", where),
                    spiffe_id=_str(n, "spiffe_id", where),
                    site=_str(n, "site", where) if "site" in n else "",
                )
            )
        return cls(tuple(models), tuple(nodes))

    def problems(self) -> list[str]:
        """What the gateway would refuse in these facts (empty: all good)."""
        out: list[str] = []
        for m in self.models:
            try:
                F.check_model(m)
            except ValueError as exc:
                out.append(str(exc))
            if not m.allowed_modes:
                out.append(f"model {m.name!r}: no allowed modes")
            if not m.name:
                out.append("a model with an empty name")
        for n in self.nodes:
            if n.trust not in TRUST_LEVELS:
                out.append(f"node {n.name!r}: trust {n.trust} is not one of 0, 1, 2")
            if not (n.name and n.region and n.provider):
                out.append(f"node {n.name!r}: name, region and provider must not be empty")
            out += node_identity_problems(n)
        # Two nodes with one DNS SAN or SPIFFE ID would let either certificate answer for
        # both names (the pin could not tell them apart), borrowing the other's region.
        for kind, names in (
            ("model name", [m.name for m in self.models]),
            ("node name", [n.name for n in self.nodes]),
            ("node dns_name", [n.dns_name for n in self.nodes if n.dns_name]),
            ("node spiffe_id", [n.spiffe_id for n in self.nodes if n.spiffe_id]),
        ):
            dup = sorted({x for x in names if names.count(x) > 1})
            if dup:
                out.append(f"{kind}(s) listed twice: {', '.join(dup)}")
        return out


# A hostname: dot-separated labels of letters, digits and inner hyphens (no wildcard).
_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_RE = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(\.{_DNS_LABEL})*")


def node_identity_problems(node: NodeFacts) -> list[str]:
    """What is wrong with a node's signed certificate identity (empty: nothing)."""
    out = []
    if not _DNS_RE.fullmatch(node.dns_name):
        # An empty pin would make gRPC check the certificate against the dialled address
        # instead, which any node certificate with that IP SAN passes.
        out.append(
            f"node {node.name!r}: dns_name {node.dns_name!r} is not a DNS name (the node "
            "certificate's DNS SAN, which the gateway pins)"
        )
    if not node.spiffe_id.startswith("spiffe://") or len(node.spiffe_id) <= len("spiffe://"):
        out.append(
            f"node {node.name!r}: spiffe_id {node.spiffe_id!r} is not a SPIFFE ID "
            "(spiffe://trust-domain/path, from the node certificate's URI SAN)"
        )
    return out


def certificate_identity(pem: bytes) -> tuple[str, str]:
    """(SPIFFE ID, DNS SAN) of a node certificate (the first PEM block, the leaf).

    ValueError unless it has exactly one spiffe:// URI SAN and exactly one DNS SAN: with
    several DNS names it is not clear which one the gateway should pin, and a pin shared
    with another certificate would not single this node out.
    """
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise ValueError(f"not a node certificate with subject alternative names ({exc})") from None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    dns = sans.get_values_for_type(x509.DNSName)
    if len(spiffe) != 1 or len(dns) != 1:
        raise ValueError(
            f"a node certificate needs exactly one SPIFFE URI SAN and one DNS SAN; this one "
            f"has SPIFFE {spiffe or 'none'} and DNS {dns or 'none'}"
        )
    return spiffe[0], dns[0]


def facts_from(
    registry_entries: Iterable[ModelEntry],
    nodes: Sequence[NodeConfig],
    model_policy: Mapping[str, Mapping[str, Any]],
    *,
    default_residency: Sequence[str] = (),
    certificates: Mapping[str, bytes] | None = None,
) -> BundleFacts:
    """The facts for a bundle from the model registry, the node inventory and the
    officer's per-model `{"owner": SPIFFE ID, "residency": [entries]}`.

    Several registry versions of one model become one fact (policy sees models by name),
    the strictest: the highest classification and the modes every version allows. A
    model `model_policy` does not mention gets no owner and `default_residency` (by
    default none: it runs nowhere, fail closed; pass ("*",) to match gateway.config's
    ModelPolicy default). A node's trust is its `trust` attribute if it has one, else
    its `trust` label, else 1 (ordinary).

    A node's certificate identity (dns_name, spiffe_id) comes from its certificate in
    `certificates` (node name -> PEM) when given, else from the inventory's `dns_name`
    and `spiffe_id`; where both are given they must agree. ValueError for anything
    inconsistent, and for a node with no identity at all (the gateway would refuse it).
    """
    merged: dict[str, tuple[str, tuple[str, ...]]] = {}
    for entry in registry_entries:
        cls, modes = entry.classification, tuple(entry.allowed_modes)
        if entry.name in merged:
            old_cls, old_modes = merged[entry.name]
            cls = max(cls, old_cls, key=_classification_rank)
            modes = tuple(x for x in old_modes if x in modes)
            if not modes:
                raise ValueError(
                    f"model {entry.name!r}: its registry versions share no allowed mode"
                )
        merged[entry.name] = (cls, modes)
    unknown = sorted(set(model_policy) - set(merged))
    if unknown:
        raise ValueError(f"model policy names models not in the registry: {', '.join(unknown)}")
    models = []
    for name, (cls, modes) in sorted(merged.items()):
        extra = model_policy.get(name, {})
        owner = extra.get("owner", "")
        residency = extra.get("residency", list(default_residency))
        if not isinstance(owner, str):
            raise ValueError(f"model policy for {name!r}: owner must be a string")
        if not isinstance(residency, list | tuple) or not all(
            isinstance(r, str) for r in residency
        ):
            raise ValueError(f"model policy for {name!r}: residency must be a list of strings")
        models.append(
            ModelFacts(
                name,
                cls,
                owner,
                tuple(sorted(residency)),
                tuple(x for x in F.MODES if x in modes),
            )
        )
    certs = dict(certificates or {})
    node_facts = []
    for node in nodes:
        trust = getattr(node, "trust", None)
        if trust is None:
            label = dict(getattr(node, "labels", ())).get("trust")
            try:
                trust = 1 if label is None else int(label)
            except ValueError:
                raise ValueError(
                    f"node {node.name!r}: trust label {label!r} is not 0, 1 or 2"
                ) from None
        spiffe_id = getattr(node, "spiffe_id", "") or ""
        dns_name = getattr(node, "dns_name", "") or ""
        if node.name in certs:
            from_cert = certificate_identity(certs.pop(node.name))
            for key, listed, found in zip(
                ("spiffe_id", "dns_name"), (spiffe_id, dns_name), from_cert, strict=True
            ):
                if listed and listed != found:
                    raise ValueError(
                        f"node {node.name!r}: the inventory's {key} {listed!r} is not the "
                        f"certificate's {found!r}; fix one of them"
                    )
            spiffe_id, dns_name = from_cert
        node_facts.append(
            NodeFacts(
                node.name,
                node.region,
                node.provider,
                int(trust),
                dns_name,
                spiffe_id,
                site=getattr(node, "site", "") or "",
            )
        )
    if certs:
        raise ValueError(f"certificates for nodes not in the inventory: {', '.join(sorted(certs))}")
    result = BundleFacts(tuple(models), tuple(sorted(node_facts, key=lambda n: n.name)))
    problems = result.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return result


def _classification_rank(classification: str) -> int:
    try:
        return F.CLASSIFICATIONS.index(classification)
    except ValueError:
        return len(F.CLASSIFICATIONS)  # unknown: treated as strictest; `problems` names it


# --------------------------------------------------------------------------- the bundle


@dataclass(frozen=True)
class Bundle:
    """One signed unit of policy. `signer_key_id` is set by `verify_bundle` from the
    signature that verified (it is not part of the signed payload); "" before signing."""

    version: int
    created: dt.datetime
    expires: dt.datetime
    min_gateway_version: str
    staleness_budget_s: int
    policy_files: dict[str, str]  # file name -> text: schema, *.cedar, identities.json
    facts: BundleFacts
    signer_key_id: str = ""
    policy_hash: str = field(default="", compare=False)  # as recorded in the payload
    review: dict[str, Any] | None = field(default=None, compare=False)  # signed metadata
    # Every trusted key whose signature verified (verify_bundle); k-of-n counts these.
    signers: tuple[str, ...] = field(default=(), compare=False)

    def policy_source(self, directory: Path | None = None) -> PolicySource:
        """The policy as `load_policy_dir` reads it from these files (same hash).

        With `directory` (which must not exist yet) the files are written there and the
        source points at it; otherwise they go through a temporary directory and the
        source's `directory` names the bundle. PolicyError when the policy is not valid.
        """
        problems = _file_name_problems(self.policy_files)
        if problems:
            raise PolicyError([_finding(p) for p in problems])
        if directory is not None:
            directory.mkdir(parents=True)
            _write_files(directory, self.policy_files)
            return load_policy_dir(directory)
        with tempfile.TemporaryDirectory(prefix="ztgate-bundle-") as tmp:
            _write_files(Path(tmp), self.policy_files)
            source = load_policy_dir(tmp)
        return dataclasses.replace(source, directory=Path(f"<policy bundle v{self.version}>"))

    def payload(self) -> dict[str, Any]:
        """The signed content as JSON (what JCS turns into the payload bytes)."""
        return {
            "format": FORMAT,
            "version": self.version,
            "created": _time_str(self.created),
            "expires": _time_str(self.expires),
            "min_gateway_version": self.min_gateway_version,
            "staleness_budget_s": self.staleness_budget_s,
            "policy": {"hash": self.policy_hash, "files": dict(sorted(self.policy_files.items()))},
            "facts": self.facts.to_json(),
            **({"review": self.review} if self.review is not None else {}),
        }


def build_bundle(
    policy_dir: Path | str,
    facts: BundleFacts,
    version: int,
    expires_in: dt.timedelta,
    min_gateway_version: str,
    staleness_budget_s: int,
    *,
    now: dt.datetime | None = None,
    review: dict[str, Any] | None = None,
) -> Bundle:
    """A bundle of `policy_dir` (checked first: PolicyError lists every finding) and
    `facts`; ValueError for facts or parameters the gateway would refuse."""
    source = load_policy_dir(policy_dir)
    root = Path(policy_dir)
    names = [SCHEMA_FILE, *source.files, IDENTITIES_FILE]
    files = {name: (root / name).read_text(encoding="utf-8") for name in names}
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a whole number >= 1, got {version!r}")
    if expires_in <= dt.timedelta(0):
        raise ValueError("expires_in must be positive")
    if not _VERSION_RE.fullmatch(min_gateway_version):
        raise ValueError(f"min_gateway_version {min_gateway_version!r} is not like 0.1.0")
    if isinstance(staleness_budget_s, bool) or staleness_budget_s < 1:
        raise ValueError("staleness_budget_s must be a whole number of seconds >= 1")
    problems = facts.problems()
    if problems:
        raise ValueError("; ".join(problems))
    created = _utc(now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    bundle = Bundle(
        version=version,
        created=created,
        expires=created + expires_in,
        min_gateway_version=min_gateway_version,
        staleness_budget_s=staleness_budget_s,
        policy_files=files,
        facts=BundleFacts(
            tuple(sorted(facts.models, key=lambda m: m.name)),
            tuple(sorted(facts.nodes, key=lambda n: n.name)),
        ),
        policy_hash=source.hash,
        review=review,
    )
    # What is signed is what was read: load the in-memory files again and compare.
    if bundle.policy_source().hash != source.hash:
        raise ValueError(f"{policy_dir} changed while the bundle was built; try again")
    return bundle


# --------------------------------------------------------------------------- signing


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what each signature is over."""
    t = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


def sign_bundle(
    bundle: Bundle, officer_key: Ed25519PrivateKey, *more_keys: Ed25519PrivateKey
) -> bytes:
    """The bundle as one signed file (a DSSE envelope, JSON, ending in a newline)."""
    if not bundle.policy_hash:
        bundle = dataclasses.replace(bundle, policy_hash=bundle.policy_source().hash)
    body = rfc8785.dumps(bundle.payload())
    signatures = [
        {
            "keyid": signing_key_id(key.public_key()),
            "sig": base64.b64encode(key.sign(pae(PAYLOAD_TYPE, body))).decode(),
        }
        for key in (officer_key, *more_keys)
    ]
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(body).decode(),
        "signatures": signatures,
    }
    return (json.dumps(envelope, indent=2) + "\n").encode()


# --------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class BundleResult:
    """What `verify_bundle` found: a verified bundle, or why not (`reason`, `message`).

    `source` is the loaded policy of a verified bundle (so it is parsed once).
    """

    bundle: Bundle | None
    reason: Reason | None = None
    message: str = ""
    source: PolicySource | None = None

    @property
    def ok(self) -> bool:
        return self.bundle is not None and self.reason is None

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            assert self.bundle is not None
            return f"policy bundle v{self.bundle.version} verified ({self.bundle.signer_key_id})"
        return f"policy bundle refused ({self.reason}): {self.message}"


def _fail(reason: Reason, message: str) -> BundleResult:
    return BundleResult(None, reason, message)


def verify_bundle(
    data: bytes,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    *,
    now: dt.datetime,
    running_version: str,
    min_version: int = 0,
    clock_skew: dt.timedelta = DEFAULT_CLOCK_SKEW,
    required: int = 1,
) -> BundleResult:
    """Check a signed bundle against the officer keys this gateway trusts (key id ->
    public key), the time, the running gateway's version and the lowest bundle version
    it may accept (the one it runs: rollback protection). `required` (k of the n trusted
    keys) is how many distinct trusted officers must have signed: the two-person rule.
    Never raises on a bad bundle;
    ValueError only for a `running_version` that is not a version (the caller's bug)."""
    running_key = _version_key(running_version)
    if len(data) > MAX_BUNDLE_BYTES:
        return _fail("malformed", f"bundle is larger than {MAX_BUNDLE_BYTES} bytes")
    # 1. the envelope
    try:
        env = _loads(data)
        if not isinstance(env, dict):
            raise BundleFormatError("not a JSON object")
        payload_type = env.get("payloadType")
        if payload_type != PAYLOAD_TYPE:
            raise BundleFormatError(f"payloadType is {payload_type!r}, not {PAYLOAD_TYPE!r}")
        body = _b64(env.get("payload"), "payload")
        sigs = env.get("signatures", [])
        if not isinstance(sigs, list):
            raise BundleFormatError("signatures must be a list")
        parsed: list[tuple[str, bytes]] = []
        for i, s in enumerate(sigs):
            if not isinstance(s, dict) or not isinstance(s.get("keyid", ""), str):
                raise BundleFormatError(f"signatures[{i}] must be {{keyid, sig}}")
            parsed.append((s.get("keyid", ""), _b64(s.get("sig"), f"signatures[{i}].sig")))
    except (BundleFormatError, ValueError, UnicodeDecodeError) as exc:
        return _fail("malformed", f"not a policy bundle envelope: {exc}")

    # 2. the signature: one by a trusted key must verify over PAE(type, payload)
    if not parsed:
        return _fail("unsigned", "the bundle carries no signature")
    message = pae(PAYLOAD_TYPE, body)
    signers: list[str] = []
    tried: list[str] = []
    for keyid, sig in parsed:
        key = trusted_keys.get(keyid)
        if key is None or keyid in signers:
            continue  # one key counts once, however often it signed
        tried.append(keyid)
        try:
            key.verify(sig, message)
        except InvalidSignature:
            continue
        signers.append(keyid)
    signer = signers[0] if signers else ""
    if not tried:
        keyids = ", ".join(k or "(none)" for k, _ in parsed)
        return _fail(
            "untrusted-key",
            f"signed by {keyids}; this gateway trusts only "
            f"{', '.join(sorted(trusted_keys)) or 'no officer key'}",
        )
    if not signer:
        return _fail(
            "bad-signature",
            f"the signature by {', '.join(tried)} does not match the payload "
            "(the bundle was altered after signing)",
        )

    if len(signers) < required:
        return _fail(
            "too-few-signatures",
            f"{len(signers)} of the {required} officer signatures this gateway requires "
            f"(signed by {', '.join(signers)}); have another officer add one "
            "(ztgate policy bundle sign --cosign)",
        )

    # 3. the signed header: times, versions (before the body, see the module doc)
    try:
        payload = _loads(body)
        if not isinstance(payload, dict):
            raise BundleFormatError("payload is not a JSON object")
        fmt = payload.get("format")
        if not isinstance(fmt, str) or not fmt.startswith("ztgate.policy-bundle/"):
            raise BundleFormatError(f"payload format is {fmt!r}, not {FORMAT!r}")
        version = _int(payload, "version", "payload")
        created = _time(payload, "created")
        expires = _time(payload, "expires")
        min_gw = _str(payload, "min_gateway_version", "payload")
        min_gw_key = _version_key(min_gw)
    except (BundleFormatError, ValueError) as exc:
        return _fail("malformed", f"signed payload: {exc}")
    now = _utc(now)
    if created > now + clock_skew:
        return _fail(
            "not-yet-valid", f"bundle v{version} is dated {_time_str(created)}, in the future"
        )
    if expires <= now:
        return _fail("expired", f"bundle v{version} expired at {_time_str(expires)}")
    if version < min_version:
        return _fail(
            "rollback",
            f"bundle v{version} is older than v{min_version}, the lowest this gateway accepts",
        )
    if running_key < min_gw_key:
        return _fail(
            "gateway-too-old",
            f"bundle v{version} needs gateway {min_gw} or later; this is {running_version}: "
            "keep the last-known-good policy and upgrade the gateway",
        )

    # 4. the signed body, strictly
    try:
        if fmt in OLD_FORMATS:
            raise BundleFormatError(
                f"payload format {fmt!r} signs no node certificate identities; rebuild and "
                "sign the bundle with this version (ztgate policy bundle sign)"
            )
        if fmt != FORMAT:
            raise BundleFormatError(f"payload format {fmt!r} is unknown to this gateway")
        _object(payload, "payload", _PAYLOAD_KEYS | (_OPTIONAL_KEYS & set(payload)))
        review = payload.get("review")
        if review is not None and not isinstance(review, dict):
            raise BundleFormatError("payload.review must be an object")
        budget = _int(payload, "staleness_budget_s", "payload")
        policy = _object(payload.get("policy"), "policy", ("hash", "files"))
        files_raw = _object(policy.get("files"), "policy.files", None)
        files = {k: _str(files_raw, k, "policy.files") for k in files_raw}
        bundle = Bundle(
            version=version,
            created=created,
            expires=expires,
            min_gateway_version=min_gw,
            staleness_budget_s=budget,
            policy_files=files,
            facts=BundleFacts.from_json(payload.get("facts")),
            signer_key_id=signer,
            policy_hash=_str(policy, "hash", "policy"),
            review=review,
            signers=tuple(signers),
        )
    except (BundleFormatError, ValueError) as exc:
        return _fail("malformed", f"signed payload: {exc}")

    # 5. the content: what the gateway itself would refuse
    problems = bundle.facts.problems()
    if budget < 1:
        problems.append(f"staleness_budget_s {budget} must be >= 1")
    if problems:
        return _fail("invalid-policy", "; ".join(problems))
    try:
        source = bundle.policy_source()
    except PolicyError as exc:
        return _fail("invalid-policy", "; ".join(str(f) for f in exc.findings))
    if source.hash != bundle.policy_hash:
        return _fail(
            "invalid-policy",
            f"policy hash recorded as {bundle.policy_hash}, but the files hash to {source.hash}",
        )
    return BundleResult(bundle, None, "", source)


def load_trusted_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Officer public keys (PEM) by key id; ValueError naming a file that is not one."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    out: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            key = load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a PEM public key ({exc})") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path} is not an Ed25519 public key")
        out[signing_key_id(key)] = key
    return out


# --------------------------------------------------------------------------- helpers


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as gateway version `a` is older than, equal to or newer than `b`."""
    ka, kb = _version_key(a), _version_key(b)
    return int(ka > kb) - int(ka < kb)


def _version_key(text: str) -> Any:
    """packaging's Version when installed (PEP 440), else a tuple of numbers."""
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pragma: no cover - packaging is nearly always there
        m = re.match(r"[0-9]+(\.[0-9]+)*", text.strip())
        if m is None:
            raise ValueError(f"{text!r} is not a version number") from None
        parts = [int(x) for x in m.group(0).split(".")]
        while len(parts) > 1 and parts[-1] == 0:
            parts.pop()
        return tuple(parts)
    try:
        return Version(text)
    except InvalidVersion:
        raise ValueError(f"{text!r} is not a version number") from None


def _utc(t: dt.datetime) -> dt.datetime:
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


def _time_str(t: dt.datetime) -> str:
    return _utc(t).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time(obj: Mapping[str, Any], key: str) -> dt.datetime:
    text = _str(obj, key, "payload")
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        raise BundleFormatError(f"payload.{key} {text!r} is not YYYY-MM-DDTHH:MM:SSZ") from None


def _loads(data: bytes) -> Any:
    try:
        return jsonstrict.loads(data, want_object=False)
    except jsonstrict.StrictJSONError as exc:
        raise BundleFormatError(f"not strict JSON ({exc.reason})") from None


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise BundleFormatError(f"{where} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BundleFormatError(f"{where} is not valid base64") from None


def _object(raw: Any, where: str, keys: Iterable[str] | None) -> dict[str, Any]:
    """`raw` as an object with exactly `keys` (any keys when None)."""
    if not isinstance(raw, dict):
        raise BundleFormatError(f"{where} must be an object")
    if keys is not None:
        want = set(keys)
        missing = sorted(want - set(raw))
        if missing:
            raise BundleFormatError(f"{where}: missing {', '.join(missing)}")
        unknown = sorted(set(raw) - want)
        if unknown:
            raise BundleFormatError(f"{where}: unknown key(s) {', '.join(unknown)}")
    return raw


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise BundleFormatError(f"{where}.{key} must be a string")
    return value


def _int(obj: Mapping[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BundleFormatError(f"{where}.{key} must be a whole number")
    return value


def _list(obj: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise BundleFormatError(f"{where}.{key} must be a list")
    return value


def _strs(obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = _list(obj, key, where)
    if not all(isinstance(v, str) for v in value):
        raise BundleFormatError(f"{where}.{key} must be a list of strings")
    return tuple(value)


def _file_name_problems(files: Mapping[str, str]) -> list[str]:
    """Only flat names the policy loader reads: no paths, nothing it would skip."""
    out = [
        f"policy file name {name!r} is not schema.cedarschema, identities.json or NAME.cedar"
        for name in files
        if name not in (SCHEMA_FILE, IDENTITIES_FILE) and not _POLICY_FILE_RE.fullmatch(name)
    ]
    return out


def _finding(message: str) -> Finding:
    return Finding("<bundle>", 1, None, None, message)


def _write_files(directory: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")


def open_unverified(data: bytes) -> Bundle:
    """A bundle's content WITHOUT checking any signature, dates or versions: for tools
    that only read it (`ztgate policy diff`, `bundle sign` adding a signature), never for
    loading. BundleFormatError when it is not a bundle."""
    env = _loads(data)
    if not isinstance(env, dict) or env.get("payloadType") != PAYLOAD_TYPE:
        raise BundleFormatError(f"not a policy bundle (payloadType {PAYLOAD_TYPE!r})")
    payload = _loads(_b64(env.get("payload"), "payload"))
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BundleFormatError(f"payload format is not {FORMAT!r}")
    _object(payload, "payload", _PAYLOAD_KEYS | (_OPTIONAL_KEYS & set(payload)))
    policy = _object(payload.get("policy"), "policy", ("hash", "files"))
    files_raw = _object(policy.get("files"), "policy.files", None)
    review = payload.get("review")
    return Bundle(
        version=_int(payload, "version", "payload"),
        created=_time(payload, "created"),
        expires=_time(payload, "expires"),
        min_gateway_version=_str(payload, "min_gateway_version", "payload"),
        staleness_budget_s=_int(payload, "staleness_budget_s", "payload"),
        policy_files={k: _str(files_raw, k, "policy.files") for k in files_raw},
        facts=BundleFacts.from_json(payload.get("facts")),
        policy_hash=_str(policy, "hash", "policy"),
        review=review if isinstance(review, dict) else None,
        signers=tuple(
            str(s.get("keyid", "")) for s in env.get("signatures", []) if isinstance(s, dict)
        ),
    )


def add_signature(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """`data` (a signed bundle) with one more signature, by `key`, over the same payload
    bytes: the second officer of a two-person rule. ValueError when `key` already signed
    it or `data` is not a bundle envelope."""
    env = _loads(data)
    if not isinstance(env, dict) or env.get("payloadType") != PAYLOAD_TYPE:
        raise BundleFormatError(f"not a policy bundle (payloadType {PAYLOAD_TYPE!r})")
    body = _b64(env.get("payload"), "payload")
    sigs = env.get("signatures", [])
    if not isinstance(sigs, list):
        raise BundleFormatError("signatures must be a list")
    keyid = signing_key_id(key.public_key())
    if any(isinstance(s, dict) and s.get("keyid") == keyid for s in sigs):
        raise ValueError(f"key {keyid} has already signed this bundle")
    sig = base64.b64encode(key.sign(pae(PAYLOAD_TYPE, body))).decode()
    envelope = {**env, "signatures": [*sigs, {"keyid": keyid, "sig": sig}]}
    return (json.dumps(envelope, indent=2) + "\n").encode()
