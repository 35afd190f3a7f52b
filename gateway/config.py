"""The gateway's configuration: one TOML file, parsed once into frozen dataclasses.

Nothing deeper in the gateway reads the environment or the file again. Relative paths
are resolved against the config file's directory. See docs/config.md for every key.

    mode = "dev"                  # or "production": refuses every dev-only item
    trust_domain = "ztgate.local"
    site = "site-a"
    registry = "registry"         # model registry directory (signatures, hashes)
    data_dir = "data"             # durable embedded state

    [listen]    host, port, admin_host, admin_port, graceful_shutdown_s, grpc_port
    [tls]       cert, key, client_ca, node_ca, node_client_cert, node_client_key,
                reload_interval_s, dev_pki
    [limits]    max_body_bytes, max_json_bytes, max_tensor_elements, max_inputs,
                max_json_depth, max_output_bytes, max_concurrent,
                max_concurrent_per_identity, decode_workers, header_timeout_s,
                idle_timeout_s
    [routing]   per_try_timeout_s, deadline_s, max_deadline_s, max_attempts,
                eject_after_failures, eject_base_s, eject_max_s, max_ejected_share,
                max_pending_per_node, health_interval_s, ewma_alpha, ewma_decay_s
    [state]     redis_url, revocation_sync_s
    [uplink]    core_url, ca, interval_s, timeout_s, models_dir
    [jobs]      max_open_per_identity, max_open, max_age_s, result_ttl_s, max_attempts,
                backoff_s, backoff_max_s, workers
    [forward]   host, port, ca, crl, max_skew_s, nonce_ttl_s, site_rate_per_s, site_burst,
                site_concurrency, max_connections, core_url, core_site, core_ca, cert, key,
                timeout_s
    [receipts]  signing_key, log_key, signer, signing_key_label, log_key_label, dir,
                checkpoint_interval_s
    [pkcs11]    module, token, slot, pin_file, required
    [receipts.retention]  body_days, check_interval_s, max_per_pass,
                checkpoint_history_keep_every_s, checkpoint_history_keep_latest
    [logging]   decisions ("stderr" | "file:<path>"), decisions_max_bytes, decisions_backups
    [generate]  max_prompt_tokens, max_tokens, default_max_tokens, max_streams_per_identity,
                first_token_timeout_s, token_timeout_s, send_timeout_s
    [zk]        artefacts, workers, deadline_s, srs_sha256, lazy_queue, lazy_per_identity,
                lazy_workers, lazy_deadline_s
    [mpc]       dealer_cert, dealer_key, dealer_listen, dealer_advertise_host, parties,
                deadline_s
    [policy]    dir | bundle, officer_keys, default_rate, pre_policy_rate,
                default_residency, watch_interval_s
    [policy.models.<name>]  owner, residency
    [[nodes]]   name, address, dns_name, spiffe_id, region, provider, trust, models, labels,
                mpc_address
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

Mode = Literal["dev", "production"]


class ConfigError(Exception):
    """The configuration file is invalid; the message names the key."""


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8443
    admin_host: str = "127.0.0.1"
    admin_port: int = 8081
    graceful_shutdown_s: int = 2
    # The KServe v2 gRPC front (Triton's GRPCInferenceService) on `host`, same mTLS and
    # client CA as `port`; unset: no gRPC front.
    grpc_port: int | None = None
    # Processes serving this replica's listeners (gateway/supervisor.py, docs/sizing.md).
    workers: int = 1

    def __post_init__(self) -> None:
        w = self.workers
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 256:
            raise ConfigError("listen.workers must be a whole number from 1 to 256")
        p = self.grpc_port
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536):
            raise ConfigError("listen.grpc_port must be a port number (1-65535)")


@dataclass(frozen=True)
class TLS:
    cert: Path
    key: Path
    client_ca: Path
    node_ca: Path
    node_client_cert: Path
    node_client_key: Path
    reload_interval_s: float = 5.0
    dev_pki: bool = False
    crl: Path | None = None  # client-CA CRL honoured at the handshake (`ztgate pki crl`)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 * 1024 * 1024
    # A request body without the binary tensor extension is JSON, decoded on the event
    # loop: ~70 ms per MiB stalls every other client, so JSON stays small and larger
    # tensors travel as raw bytes (Inference-Header-Content-Length), which cost no parsing.
    # Also the cap on the JSON header of a binary request.
    max_json_bytes: int = 1024 * 1024
    max_tensor_elements: int = 4 * 1024 * 1024
    max_inputs: int = 64
    max_json_depth: int = 32
    max_output_bytes: int = 64 * 1024 * 1024
    # Requests this process works on at once (503 past it), and per client identity (429):
    # checked before the body is read, so one client cannot hold every slot, or the loop.
    # Per worker with listen.workers > 1 (docs/sizing.md): N times these per replica.
    max_concurrent: int = 256
    max_concurrent_per_identity: int = 8
    # Worker processes that decode JSON bodies over 64 KiB off the event loop (one such
    # decode per client identity at a time; gateway.pipeline.offload).
    decode_workers: int = 1
    # A request's headers must be complete this long after its first byte; a connection
    # with no request in progress is closed after idle_timeout_s (also before the first).
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ConfigError(f"limits.{f.name} must be positive")


@dataclass(frozen=True)
class Generate:
    """Generative models (gateway.generate): caps every client gets whatever policy says;
    policy may only tighten them."""

    max_prompt_tokens: int = 8192
    max_tokens: int = 1024
    default_max_tokens: int = 64  # when a request names no max_tokens
    # Open streams per client identity in this process (429 past it; per worker), besides
    # limits.max_concurrent_per_identity, which a stream holds only until its first token.
    max_streams_per_identity: int = 4
    first_token_timeout_s: float = 30.0
    token_timeout_s: float = 10.0  # most time between two tokens from a node
    # A client that reads nothing for this long loses its stream (cancelled at the node).
    send_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ConfigError(f"generate.{f.name} must be positive")
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError("generate.default_max_tokens must not exceed generate.max_tokens")


@dataclass(frozen=True)
class Routing:
    per_try_timeout_s: float = 2.0
    deadline_s: float = 10.0
    max_deadline_s: float = 60.0
    max_attempts: int = 3
    eject_after_failures: int = 3
    eject_base_s: float = 5.0
    eject_max_s: float = 300.0
    max_ejected_share: float = 0.5
    max_pending_per_node: int = 64
    health_interval_s: float = 2.0
    ewma_alpha: float = 0.2
    # An idle node's latency estimate halves about every 0.7 x this: a node whose last
    # replies were slow is tried again by traffic instead of left out for good.
    ewma_decay_s: float = 10.0


@dataclass(frozen=True)
class ReputationConfig:
    """[reputation]: lie accounting, spot checks of mode none, quarantine (docs/reputation.md)."""

    spot_checks: bool = False  # re-run a sample of mode-none answers on another provider
    rate_suspect: float = 0.25  # new nodes, or any contradiction on record (node or provider)
    rate_established: float = 0.05  # >= trusted_after confirmations, none contradicted
    rate_trusted: float = 0.02  # >= long_trusted_after confirmations; never zero
    trusted_after: int = 50
    long_trusted_after: int = 1000
    queue: int = 256  # checks waiting; past it a check is dropped and counted
    workers: int = 2
    check_timeout_s: float = 10.0
    p0: float = 1e-3  # honest-disagreement rate assumed from the tolerance
    p1: float = 0.05  # lie rate the test is tuned for
    alpha: float = 1e-9  # false-positive bound per start point: N judged replies <= N * alpha


@dataclass(frozen=True)
class State:
    redis_url: str | None = None
    revocation_sync_s: float = 2.0
    timeout_s: float = 0.5  # every Redis call; past it, soft state degrades, limits fail closed


@dataclass(frozen=True)
class Jobs:
    """[jobs]: the asynchronous jobs API (gateway/jobs/, docs/jobs.md): submit, then poll."""

    max_open_per_identity: int = 16  # queued or running jobs one client may hold
    max_open: int = 10_000  # in all: the queue's bound on this replica
    max_age_s: float = 3600.0  # a job not done by then fails as expired
    result_ttl_s: float = 86400.0  # a finished job (and its result) is deleted after this
    max_attempts: int = 8  # runs that failed retryably (no node, overloaded) before it fails
    backoff_s: float = 1.0  # first retry delay; doubles up to backoff_max_s
    backoff_max_s: float = 60.0
    workers: int = 4  # jobs run at once on this replica
    # The key that seals each job (gateway/jobs/seal.py); unset: <data_dir>/jobs.key, made
    # on first start. Replicas sharing a Redis must share this file.
    key_file: Path | None = None
    lease_s: float = 30.0  # with Redis: a run's lease, renewed while it runs
    adopt_after_s: float = 600.0  # a job marked for another replica's log waits this for it

    def __post_init__(self) -> None:
        if not (_finite(self.lease_s) and self.lease_s > 0):
            raise ConfigError("jobs.lease_s must be a positive number of seconds")
        if not 0 < self.adopt_after_s < self.max_age_s:
            raise ConfigError("jobs: need 0 < adopt_after_s < max_age_s")
        if min(self.max_open_per_identity, self.max_open, self.max_attempts, self.workers) < 1:
            raise ConfigError("jobs: max_open_per_identity, max_open, max_attempts, workers >= 1")
        if not 0 < self.backoff_s <= self.backoff_max_s:
            raise ConfigError("jobs: need 0 < backoff_s <= backoff_max_s")
        if self.max_age_s <= 0 or self.result_ttl_s <= 0:
            raise ConfigError("jobs: max_age_s and result_ttl_s must be positive")


@dataclass(frozen=True)
class Uplink:
    """[uplink]: an edge site pulling from its core (docs/ddil.md, gateway/uplink.py): the
    client CA's CRL first, then the signed policy bundle and model files; resumable,
    hash-checked. Unset `core_url`: no pulling (a core, or an edge fed by hand)."""

    core_url: str | None = None  # the core's publish URL, e.g. https://core:8090/publish
    ca: Path | None = None  # CA of the core's TLS certificate (default: the system's)
    interval_s: float = 30.0
    timeout_s: float = 30.0  # each request; a download resumes where a cut left it
    models_dir: Path | None = None  # where published model files are staged (unset: none)

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.timeout_s <= 0:
            raise ConfigError("uplink: interval_s and timeout_s must be positive")
        if self.core_url is not None and not self.core_url.startswith(("https://", "http://")):
            raise ConfigError("uplink.core_url: an http(s) URL")


@dataclass(frozen=True)
class Forward:
    """[forward]: edge -> core forwarding (docs/ddil.md, "Forwarding to the core";
    gateway/forward/). At a core, `port` opens a listener that accepts only forwarder
    certificates (`ca`: the forwarder CA, nothing else). At an edge, `core_url` is where a
    request goes when no local node can serve it, sent with the site's forwarder `cert`
    and `key`. Both unset: off."""

    host: str = "127.0.0.1"
    port: int | None = None
    ca: Path | None = None  # the forwarder CA: the forward listener's whole trust store
    crl: Path | None = None  # the forwarder CA's CRL: revoked sites fail the handshake
    max_skew_s: float = 30.0  # a statement's time may differ from the core's by this much
    nonce_ttl_s: float = 120.0  # how long a statement's nonce is remembered (>= 2 x skew)
    # Per site: 100/s x nonce_ttl_s 120 = 12k nonce keys at most, well under the shared
    # cache's bound, while a whole edge's failover traffic still fits.
    site_rate_per_s: float = 100.0  # statements one site may send per second, on average
    site_burst: int = 200  # and at once
    site_concurrency: int = 16  # one site's forwarded requests in the core at a time
    max_connections: int = 128  # the forward listener's connections and requests, all sites
    core_url: str | None = None  # the core's forward listener, https://core:8444
    core_site: str = "site-a"  # the core's site: its gateway SPIFFE ID is the audience
    core_ca: Path | None = None  # CA of the core's TLS certificate (required with core_url)
    cert: Path | None = None  # this site's forwarder certificate (spiffe://td/site/S/forwarder)
    key: Path | None = None
    timeout_s: float = 10.0  # each forwarded request, end to end

    def __post_init__(self) -> None:
        if self.max_skew_s <= 0 or self.timeout_s <= 0:
            raise ConfigError("forward: max_skew_s and timeout_s must be positive")
        if self.nonce_ttl_s < 2 * self.max_skew_s:
            # A nonce forgotten while its statement is still inside the window replays.
            raise ConfigError("forward.nonce_ttl_s must be at least twice max_skew_s")
        if self.port is not None and self.ca is None:
            raise ConfigError("forward.port needs forward.ca (the forwarder CA)")
        if self.site_rate_per_s <= 0 or min(self.site_burst, self.site_concurrency) < 1:
            raise ConfigError("forward: site_rate_per_s, site_burst, site_concurrency positive")
        if self.max_connections < 1:
            raise ConfigError("forward.max_connections must be at least 1")
        if self.core_url is not None:
            if not self.core_url.startswith("https://"):
                raise ConfigError("forward.core_url: an https:// URL")
            if self.cert is None or self.key is None:
                raise ConfigError("forward.core_url needs forward.cert and forward.key")
            if self.core_ca is None:
                # The system's roots would let any public certificate for the core's
                # hostname stand in for the core: its CA is pinned, always.
                raise ConfigError("forward.core_url needs forward.core_ca (the core's CA)")


@dataclass(frozen=True)
class Retention:
    """[receipts.retention]: what the retention job (gateway.receipts.retention) deletes.

    Bodies (and their evidence files) go; leaves, checkpoints needed for verification and
    the logged erasure events stay, so every log keeps verifying."""

    # Receipt bodies and evidence older than this many days are erased. Unset: kept for
    # good. Deletion is irreversible and the lawful period differs per deployment, so
    # there is no default age: the operator chooses one (docs/config.md).
    body_days: float | None = None
    check_interval_s: float = 3600.0  # how often the job looks for due bodies
    # At most this many bodies erased per pass: one transaction on the log's writer
    # thread, which appends wait behind (~0.1 ms a body, so ~25 ms). While behind, the
    # job keeps retention to a tenth of the writer's time (gateway.receipts.retention).
    max_per_pass: int = 250
    # Checkpoint history: one checkpoint per this many seconds is kept (plus the latest
    # `checkpoint_history_keep_latest` and whatever verification needs); 0 keeps all.
    # Off by default: a compaction reads every stored checkpoint in one transaction on the
    # writer thread (~20 us each, bench/retention.py), so on a long history one pass would
    # hold answers back for minutes. Turn it on once that is bounded per call.
    checkpoint_history_keep_every_s: float = 0.0
    checkpoint_history_keep_latest: int = 64

    @property
    def enabled(self) -> bool:
        return self.body_days is not None or self.checkpoint_history_keep_every_s > 0


# Upper bounds that catch a unit mistake (milliseconds for seconds) or a pass so large it
# would stall the log's writer thread; nothing legitimate comes near them.
MAX_RETENTION_PER_PASS = 100_000
MAX_INTERVAL_S = 7 * 86400.0


@dataclass(frozen=True)
class Receipts:
    signing_key: Path | None = None  # Ed25519: signs receipts
    log_key: Path | None = None  # Ed25519, a different key: signs the log's checkpoints
    # Where the two keys are: "file" (signing_key, log_key: PEM files) or "pkcs11" (in the
    # [pkcs11] token, by signing_key_label and log_key_label; gateway.signer).
    signer: str = "file"
    signing_key_label: str | None = None
    log_key_label: str | None = None
    dir: Path | None = None  # default: <data_dir>/receipts
    checkpoint_interval_s: float = 1.0
    # This replica's API base URL (https://host:port), announced in the shared store so
    # another replica asked for this replica's log or receipts redirects the reader here.
    public_url: str | None = None
    # Every replica's public_url. A redirect goes only to one of these: the shared store
    # says which replica holds a log, but whoever can write Redis must not be able to send
    # auditors and witnesses somewhere else.
    replicas: tuple[str, ...] = ()
    # Witnesses that cosign each checkpoint: [vkey (C2SP note verifier key), URL] pairs.
    witnesses: tuple[tuple[str, str], ...] = ()
    # An edge site's core: the URLs (of witnesses above) that keep this log's evidence.
    # Leaves and bodies the core lacks are uploaded before it is asked to cosign, so what
    # reached the core outlives the edge (gateway/receipts/vault.py).
    reconcile_with: tuple[str, ...] = ()
    retention: Retention = field(default_factory=Retention)

    @property
    def enabled(self) -> bool:
        if self.signer == "pkcs11":
            return self.signing_key_label is not None and self.log_key_label is not None
        return self.signing_key is not None and self.log_key is not None


@dataclass(frozen=True)
class Pkcs11:
    """[pkcs11]: the PKCS#11 token that holds signing keys (gateway.signer): the vendor's
    module, the token by label or slot id, and a file with the user PIN (never the PIN
    itself in this file). `required`: production refuses signing keys kept in files."""

    module: Path | None = None  # the token's PKCS#11 library (.so)
    token: str | None = None  # the token's label; or slot
    slot: int | None = None  # the slot id holding the token
    pin_file: Path | None = None  # the user PIN, one line, not readable by others
    required: bool = False  # production: every signing key must be in the token


@dataclass(frozen=True)
class Logging:
    """[logging]: where the decision log (`ztgate.decisions`, one JSON line per policy
    decision) goes. ``stderr`` (default) hands it to the container's log shipper with the
    other logs; ``file:<path>`` writes it alone to a file rotated by size, so it never
    grows without bound: at most (decisions_backups + 1) x decisions_max_bytes on disk.
    ``level`` and ``format`` are every other logger's (gateway/telemetry.py): ``json``
    writes one object per line (time, level, logger, message, request_id, trace_id)."""

    decisions: str = "stderr"
    decisions_max_bytes: int = 100 * 1024 * 1024
    decisions_backups: int = 10
    level: str = "info"  # debug | info | warning | error
    format: str = "json"  # json | text

    @property
    def decisions_file(self) -> Path | None:
        return Path(self.decisions[5:]) if self.decisions.startswith("file:") else None


@dataclass(frozen=True)
class Zk:
    artefacts: tuple[str, ...] = ()  # `ztgate zk onboard` output directories (verifier side)
    workers: int = 1  # proof-verification worker processes
    deadline_s: float = 120.0  # proving takes seconds: the default deadline for mode zk
    # SHA-256 of each SRS (KZG setup) file trusted for proofs. Production serves only models
    # whose record names one of these; whoever knows an SRS's toxic waste can forge proofs.
    srs_sha256: tuple[str, ...] = ()
    # Lazy proofs (@proof("lazy..."), docs/zk.md): proofs waiting or running, those of one
    # client identity, background provers at once, and how long a proof may take to arrive.
    lazy_queue: int = 64
    lazy_per_identity: int = 8
    lazy_workers: int = 1
    lazy_deadline_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("lazy_queue", "lazy_per_identity", "lazy_workers", "lazy_deadline_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"zk.{name} must be positive")


@dataclass(frozen=True)
class Mpc:
    dealer_cert: Path | None = None  # spiffe://<td>/gateway/dealer, from the site gateway CA
    dealer_key: Path | None = None
    dealer_listen: str = "127.0.0.1:0"
    dealer_advertise_host: str | None = None  # what parties dial; default: the listen host
    parties: int = 2
    deadline_s: float = 60.0


@dataclass(frozen=True)
class ModelPolicy:
    """Facts about a model that policy decides on and the registry does not hold."""

    owner: str = ""
    residency: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class PolicyConfig:
    dir: Path | None = None  # an unsigned policy directory: dev mode only, watched
    bundle: Path | None = None  # a signed policy bundle (required in production)
    officer_keys: tuple[str, ...] = ()  # Ed25519 public keys (PEM paths) trusted to sign bundles
    signatures_required: int = 1  # k of the officer_keys that must sign a bundle (two-person rule)
    default_rate: str = "60/minute"  # for a permit without @rate: never unlimited
    pre_policy_rate: str = "1200/minute"  # per identity, before policy runs
    watch_interval_s: float = 2.0
    nonce_window_s: float = 300.0  # replay window of the optional ztgate-nonce header
    models: tuple[tuple[str, ModelPolicy], ...] = ()

    def model(self, name: str) -> ModelPolicy:
        return dict(self.models).get(name, ModelPolicy())


@dataclass(frozen=True)
class NodeConfig:
    """Where a node is. With a signed policy bundle, only `address`, `mpc_address`,
    `models` and `labels` are taken from here: the gateway uses the bundle's dns_name,
    spiffe_id, region, provider and trust for the node of that name (gateway.policy.live
    .signed_nodes), refuses an entry whose dns_name or spiffe_id disagrees with them, and
    pins the channel to the signed dns_name. With an unsigned policy directory (dev) these
    fields are the facts themselves, and dns_name and spiffe_id are required."""

    name: str
    address: str  # host:port of the node's gRPC (mTLS) endpoint
    region: str
    provider: str
    trust: int = 1  # 0: untrusted hardware (policy may allow only mpc there)
    # The node certificate's unique DNS SAN (pinned per channel) and SPIFFE ID; optional
    # with a bundle, which signs them; if given, they must match the bundle's.
    dns_name: str = field(default="", kw_only=True)
    spiffe_id: str = field(default="", kw_only=True)
    site: str = field(default="", kw_only=True)  # "": this gateway's site (signed with a bundle)
    mpc_address: str | None = None  # host:port of the node's `ztgate mpc party`
    models: tuple[str, ...] = ()  # empty: every model in the registry
    labels: tuple[tuple[str, str], ...] = ()

    def serves(self, model: str) -> bool:
        return not self.models or model in self.models


@dataclass(frozen=True)
class Config:
    tls: TLS
    registry: Path
    data_dir: Path
    mode: Mode = "dev"
    trust_domain: str = "ztgate.local"
    site: str = "site-a"
    listen: Listen = field(default_factory=Listen)
    limits: Limits = field(default_factory=Limits)
    routing: Routing = field(default_factory=Routing)
    generate: Generate = field(default_factory=Generate)
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    state: State = field(default_factory=State)
    uplink: Uplink = field(default_factory=Uplink)
    forward: Forward = field(default_factory=Forward)
    jobs: Jobs = field(default_factory=Jobs)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    receipts: Receipts = field(default_factory=Receipts)
    zk: Zk = field(default_factory=Zk)
    mpc: Mpc = field(default_factory=Mpc)
    logging: Logging = field(default_factory=Logging)
    pkcs11: Pkcs11 = field(default_factory=Pkcs11)
    nodes: tuple[NodeConfig, ...] = ()

    def dev_only_items(self) -> list[str]:
        """What production mode refuses, each named so the operator can fix it."""
        items = []
        if self.tls.dev_pki:
            items.append("tls.dev_pki: certificates from the development PKI")
        # The flag is self-declared, so the certificates are asked too: a config that omits
        # it must not pass the dev PKI off as a production one.
        if not self.tls.dev_pki and (found := dev_pki_certificates(self.tls)):
            items.append(
                f"tls: {', '.join(found)} issued by the development PKI; "
                "issue them from your own CA (see deploy/README.md)"
            )
        if self.state.redis_url is None:
            items.append(
                "state.redis_url unset: soft state only in this replica's memory; "
                "set it to a rediss:// URL with an ACL user"
            )
        elif self.state.redis_url.startswith("redis://"):
            items.append("state.redis_url is plaintext redis://; use rediss:// with an ACL user")
        elif weak := weakened_tls_params(self.state.redis_url):
            items.append(
                f"state.redis_url turns TLS checks off ({', '.join(weak)}); remove them and "
                "give the server's CA with ssl_ca_certs"
            )
        if self.state.redis_url is not None and self.jobs.key_file is None:
            # Replicas share jobs through Redis: a job one accepts may run on another, and a
            # key each made for itself (<data_dir>/jobs.key) fails every such job's seal.
            items.append(
                "state.redis_url without jobs.key_file: each replica would seal jobs with a "
                "key of its own, so a job another replica runs fails; provision one key for "
                "every replica (deploy/README.md) and set jobs.key_file"
            )
        if self.policy.dir is not None:
            items.append(
                "policy.dir: an unsigned policy directory; have an officer sign a bundle "
                "(ztgate policy bundle) and set policy.bundle"
            )
        if not self.receipts.enabled:
            items.append(
                "receipts disabled: set receipts.signing_key and receipts.log_key "
                "(two different Ed25519 keys), or their labels in a PKCS#11 token"
            )
        elif self.pkcs11.required and self.receipts.signer != "pkcs11":
            items.append(
                "receipts.signing_key and receipts.log_key are files but pkcs11.required: "
                "import them into the token (ztgate token import) and set "
                'receipts.signer = "pkcs11"'
            )
        if self.policy.bundle is not None and not self.policy.officer_keys:
            items.append(
                "policy.bundle without policy.officer_keys: list the officers' public keys "
                "so its signature is checked"
            )
        if self.forward.port is not None and self.forward.crl is None:
            items.append(
                "forward.port without forward.crl: a captured edge's forwarder certificate "
                "could not be revoked; set forward.crl to the forwarder CA's CRL"
            )
        if self.uplink.core_url is not None and self.uplink.core_url.startswith("http://"):
            items.append("uplink.core_url is plaintext http://; use https:// (and uplink.ca)")
        return items


def dev_pki_certificates(tls: TLS) -> list[str]:
    """The configured certificate files that come from the development PKI."""
    from gateway.pki import made_by_dev_pki

    files = {
        "tls.cert": tls.cert,
        "tls.client_ca": tls.client_ca,
        "tls.node_ca": tls.node_ca,
        "tls.node_client_cert": tls.node_client_cert,
    }
    return [name for name, path in files.items() if made_by_dev_pki(path)]


# redis-py reads these from the URL; each turns off part of the server's TLS check.
_WEAK_TLS = {
    "ssl_cert_reqs": lambda v: v.lower() not in ("required", "cert_required"),
    "ssl_check_hostname": lambda v: v.lower() in ("false", "0", "no", "off"),
}


def weakened_tls_params(url: str) -> list[str]:
    """Query parameters of a rediss:// URL that weaken certificate checking."""
    from urllib.parse import parse_qsl, urlsplit

    return sorted(
        f"{k}={v}"
        for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True)
        if k.lower() in _WEAK_TLS and _WEAK_TLS[k.lower()](v)
    )


T = TypeVar("T")


def _build(cls: type[T], data: Any, where: str, base: Path) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"[{where}] unknown key(s): {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        ftype = str(known[name].type)
        if "Path" in ftype:
            if not isinstance(value, str):
                raise ConfigError(f"{where}.{name} must be a path string")
            value = (base / value).resolve()
        elif ftype.startswith("tuple") and isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif ftype.startswith("tuple") and isinstance(value, dict):
            value = tuple(sorted((str(k), str(v)) for k, v in value.items()))
        elif ftype == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"[{where}] {exc}") from exc
    _check_types(obj, where)
    return obj


def _check_types(obj: Any, where: str) -> None:
    for f in fields(obj):
        value = getattr(obj, f.name)
        expected = {"int": int, "float": float, "str": str, "bool": bool}.get(str(f.type))
        if expected and (not isinstance(value, expected) or (expected is int and value is True)):
            raise ConfigError(f"{where}.{f.name} must be {f.type}, got {value!r}")


def _policy(data: Any, base: Path) -> PolicyConfig:
    if not isinstance(data, dict):
        raise ConfigError("[policy] must be a table")
    data = dict(data)
    models = data.pop("models", {})
    if not isinstance(models, dict):
        raise ConfigError("[policy.models] must be a table of model tables")
    keys = data.get("officer_keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ConfigError("policy.officer_keys must be a list of paths")
    data["officer_keys"] = [str((base / k).resolve()) for k in keys]
    cfg = _build(PolicyConfig, data, "policy", base)
    facts = tuple(
        (str(name), _build(ModelPolicy, m, f"policy.models.{name}", base))
        for name, m in sorted(models.items())
    )
    if cfg.dir is not None and cfg.bundle is not None:
        raise ConfigError("policy: set either dir (dev) or bundle, not both")
    k = cfg.signatures_required
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError("policy.signatures_required must be a whole number >= 1")
    if cfg.bundle is not None and cfg.officer_keys and k > len(set(cfg.officer_keys)):
        raise ConfigError(
            f"policy.signatures_required is {k} but only {len(set(cfg.officer_keys))} "
            "officer_keys are listed: no bundle could ever load"
        )
    from gateway.policy.facts import Rate

    for key in ("default_rate", "pre_policy_rate"):
        try:
            Rate.parse(getattr(cfg, key))
        except ValueError as exc:
            raise ConfigError(f"policy.{key}: {exc}") from exc
    return dataclasses.replace(cfg, models=facts)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _retention(data: Any, base: Path) -> Retention:
    data = dict(data) if isinstance(data, dict) else data
    days = data.pop("body_days", None) if isinstance(data, dict) else None
    r = _build(Retention, data, "receipts.retention", base)
    where = "receipts.retention"
    if days is not None:
        # Unset keeps bodies; an age that is zero, negative, infinite or NaN is a mistake
        # (zero would erase every answer's body as soon as it is logged).
        if not _finite(days) or days <= 0:
            raise ConfigError(
                f"{where}.body_days must be a positive number of days, got {days!r} "
                "(leave it out to keep bodies)"
            )
        r = dataclasses.replace(r, body_days=float(days))
    if not (_finite(r.check_interval_s) and 1.0 <= r.check_interval_s <= MAX_INTERVAL_S):
        raise ConfigError(
            f"{where}.check_interval_s must be within [1, {MAX_INTERVAL_S:g}] seconds, "
            f"got {r.check_interval_s!r}"
        )
    if not 1 <= r.max_per_pass <= MAX_RETENTION_PER_PASS:
        raise ConfigError(
            f"{where}.max_per_pass must be within [1, {MAX_RETENTION_PER_PASS}], "
            f"got {r.max_per_pass!r}"
        )
    keep = r.checkpoint_history_keep_every_s
    if not _finite(keep) or keep < 0 or 0 < keep < 1:
        raise ConfigError(
            f"{where}.checkpoint_history_keep_every_s must be 0 (keep all) or at least 1 "
            f"second, got {keep!r}"
        )
    if r.checkpoint_history_keep_latest < 1:
        raise ConfigError(
            f"{where}.checkpoint_history_keep_latest must be at least 1, "
            f"got {r.checkpoint_history_keep_latest!r}"
        )
    return r


# A decision line is a few hundred bytes: a file smaller than this would rotate every few
# lines. Without a backup RotatingFileHandler never rotates (the file grows unbounded).
MIN_DECISION_FILE_BYTES = 4096
MAX_DECISION_BACKUPS = 1000
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")


def _logging(data: Any, base: Path) -> Logging:
    cfg = _build(Logging, data, "logging", base)
    target = cfg.decisions
    if target.startswith("file:"):
        if not target[5:].strip():
            raise ConfigError('logging.decisions: "file:" needs a path')
        cfg = dataclasses.replace(cfg, decisions="file:" + str((base / target[5:]).resolve()))
    elif target != "stderr":
        raise ConfigError(f'logging.decisions must be "stderr" or "file:<path>", got {target!r}')
    if cfg.decisions_max_bytes < MIN_DECISION_FILE_BYTES:
        raise ConfigError(
            f"logging.decisions_max_bytes must be at least {MIN_DECISION_FILE_BYTES}, "
            f"got {cfg.decisions_max_bytes!r}"
        )
    if not 1 <= cfg.decisions_backups <= MAX_DECISION_BACKUPS:
        raise ConfigError(
            f"logging.decisions_backups must be within [1, {MAX_DECISION_BACKUPS}], "
            f"got {cfg.decisions_backups!r}"
        )
    if cfg.level not in LOG_LEVELS:
        raise ConfigError(
            f"logging.level must be one of {', '.join(LOG_LEVELS)}, got {cfg.level!r}"
        )
    if cfg.format not in LOG_FORMATS:
        raise ConfigError(f'logging.format must be "json" or "text", got {cfg.format!r}')
    return cfg


def _check_signer(r: Receipts, token: Pkcs11) -> None:
    """[receipts] keys are either files or token labels, and a token is fully named."""
    if r.signer not in ("file", "pkcs11"):
        raise ConfigError(f'receipts.signer must be "file" or "pkcs11", got {r.signer!r}')
    if r.signer == "file" and r.signing_key_label is not None:
        raise ConfigError(
            'receipts: signing_key_label and log_key_label need receipts.signer = "pkcs11"'
        )
    if r.signer == "pkcs11":
        if r.signing_key is not None:
            raise ConfigError(
                'receipts.signer = "pkcs11" takes signing_key_label and log_key_label, '
                "not the key files signing_key and log_key"
            )
        if r.enabled and r.signing_key_label == r.log_key_label:
            raise ConfigError("receipts: the log key must differ from the receipt signing key")
        missing = [k for k in ("module", "pin_file") if getattr(token, k) is None]
        if missing:
            raise ConfigError(
                f'receipts.signer = "pkcs11" needs pkcs11.{" and pkcs11.".join(missing)}'
            )
    if token.slot is not None and (isinstance(token.slot, bool) or not isinstance(token.slot, int)):
        raise ConfigError(f"pkcs11.slot must be a slot id (int), got {token.slot!r}")
    if token.module is not None and (token.token is None) == (token.slot is None):
        raise ConfigError("pkcs11: name the token by token (its label) or by slot, one of them")


def load_config(path: Path) -> Config:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return parse_config(raw, path.parent.resolve())


def parse_config(raw: dict[str, Any], base: Path) -> Config:
    raw = dict(raw)
    sections: dict[str, Any] = {}
    simple: tuple[tuple[str, type], ...] = (
        ("listen", Listen),
        ("limits", Limits),
        ("routing", Routing),
        ("generate", Generate),
        ("reputation", ReputationConfig),
        ("zk", Zk),
        ("mpc", Mpc),
        ("uplink", Uplink),
        ("forward", Forward),
        ("jobs", Jobs),
    )
    for name, cls in simple:
        if name in raw:
            sections[name] = _build(cls, raw.pop(name), name, base)
    if "state" in raw:
        sections["state"] = _build(State, raw.pop("state"), "state", base)
    if "zk" in sections:
        z = sections["zk"]
        sections["zk"] = dataclasses.replace(
            z, artefacts=tuple(str((base / a).resolve()) for a in z.artefacts)
        )
    if "logging" in raw:
        sections["logging"] = _logging(raw.pop("logging"), base)
    if "receipts" in raw:
        receipts = raw.pop("receipts")
        retention = None
        if isinstance(receipts, dict) and "retention" in receipts:
            receipts = dict(receipts)
            retention = _retention(receipts.pop("retention"), base)
        sections["receipts"] = _build(Receipts, receipts, "receipts", base)
        if retention is not None:
            sections["receipts"] = dataclasses.replace(sections["receipts"], retention=retention)
        r = sections["receipts"]
        if (r.signing_key is None) != (r.log_key is None):
            raise ConfigError("receipts: set both signing_key and log_key, or neither")
        if (r.signing_key_label is None) != (r.log_key_label is None):
            raise ConfigError("receipts: set both signing_key_label and log_key_label, or neither")
        if any(len(w) != 2 for w in r.witnesses):
            raise ConfigError("receipts.witnesses: a list of [vkey, url] pairs")
        unknown = set(r.reconcile_with) - {url for _, url in r.witnesses}
        if unknown:
            raise ConfigError(
                f"receipts.reconcile_with: {', '.join(sorted(unknown))} is not the URL of a "
                "witness in receipts.witnesses"
            )
        sections["receipts"] = r = dataclasses.replace(
            r, replicas=tuple(u.rstrip("/") for u in r.replicas)
        )
        if r.public_url is not None and r.replicas and r.public_url.rstrip("/") not in r.replicas:
            raise ConfigError("receipts.replicas must include this replica's public_url")
        if r.signing_key is not None and r.signing_key == r.log_key:
            raise ConfigError("receipts: the log key must differ from the receipt signing key")
    if "pkcs11" in raw:
        sections["pkcs11"] = _build(Pkcs11, raw.pop("pkcs11"), "pkcs11", base)
    _check_signer(sections.get("receipts", Receipts()), sections.get("pkcs11", Pkcs11()))
    if "policy" in raw:
        sections["policy"] = _policy(raw.pop("policy"), base)
    if "tls" not in raw:
        raise ConfigError("[tls] is required")
    sections["tls"] = _build(TLS, raw.pop("tls"), "tls", base)
    nodes = raw.pop("nodes", [])
    if not isinstance(nodes, list):
        raise ConfigError("[[nodes]] must be an array of tables")
    sections["nodes"] = tuple(
        _build(NodeConfig, n, f"nodes[{i}]", base) for i, n in enumerate(nodes)
    )
    names = [n.name for n in sections["nodes"]]
    if len(set(names)) != len(names):
        raise ConfigError("node names must be unique")
    for key in ("registry", "data_dir"):
        if key not in raw:
            raise ConfigError(f"{key} is required")
    cfg = _build(Config, {**raw, **sections}, "top level", base)
    if cfg.mode not in ("dev", "production"):
        raise ConfigError("mode must be 'dev' or 'production'")
    r = cfg.routing
    if not 0 < r.max_ejected_share <= 1 or r.max_attempts < 1 or r.deadline_s <= 0:
        raise ConfigError("routing: max_ejected_share in (0,1], max_attempts >= 1, deadline_s > 0")
    if not 0 < r.eject_base_s <= r.eject_max_s:
        raise ConfigError("routing: need 0 < eject_base_s <= eject_max_s")
    if r.ewma_decay_s <= 0:
        raise ConfigError("routing: ewma_decay_s must be positive")
    # A run's lease, renewed every third of it, must outlast renewals that take the whole
    # Redis deadline (2 x timeout_s + 0.25, gateway/jobs/redis.py): else a live run's job
    # is claimed again while it runs.
    floor = 3 * (2 * cfg.state.timeout_s + 0.25)
    if cfg.state.redis_url and not cfg.jobs.lease_s > floor:
        raise ConfigError(
            f"jobs.lease_s must exceed 3 x (2 x state.timeout_s + 0.25) = {floor:g} s"
        )
    rep = cfg.reputation
    if not all(0 < x <= 1 for x in (rep.rate_suspect, rep.rate_established, rep.rate_trusted)):
        raise ConfigError("reputation: spot-check rates must be in (0, 1]; never zero")
    if not (0 < rep.p0 < rep.p1 < 1 and 0 < rep.alpha < 1 and rep.queue >= 1 and rep.workers >= 1):
        raise ConfigError("reputation: need 0 < p0 < p1 < 1, 0 < alpha < 1, queue and workers >= 1")
    return cfg
