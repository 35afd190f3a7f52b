"""Build a gateway from its config and run it: the mTLS API and the admin listener."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import signal
import socket
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import uvicorn
from cryptography import x509

from gateway.app import Gateway, build_admin, build_api
from gateway.clock import PersistedClock
from gateway.config import Config, ConfigError, Logging, NodeConfig
from gateway.identity import IdentityResolver
from gateway.policy.facts import IdentityFacts
from gateway.policy.live import LivePolicy, Loaded, ReloadRefused, bundle_loader, dir_loader
from gateway.policy.source import PolicyError
from gateway.receipts.log import ReceiptLog
from gateway.receipts.service import ReceiptService
from gateway.registry import ModelEntry, Registry, RegistryError
from gateway.revocation import Revocations
from gateway.routing.accounting import add_lie_accounting
from gateway.routing.node_client import NodeClient, NodeCredentials
from gateway.routing.router import Router
from gateway.server import ReloadingContext, TLSFiles, tls_protocol
from gateway.signer import FileSigner, Pkcs11Signer, Signer, SignerError, Token
from gateway.state.factory import open_store
from gateway.telemetry import configure_logging, setup_tracing, shutdown_tracing

if TYPE_CHECKING:
    from gateway.supervisor import Worker
    from zk.record import VerifierArtefacts

log = logging.getLogger(__name__)


class ProductionRefused(ConfigError):
    """Production mode found dev-only or unsafe items; each is listed."""


def check_mode(cfg: Config) -> None:
    items = cfg.dev_only_items()
    if cfg.mode == "production" and items:
        raise ProductionRefused("production mode refuses: " + "; ".join(items))
    for item in items:
        log.warning("DEV-ONLY in use: %s", item)


def load_models(cfg: Config) -> dict[str, dict[str, ModelEntry]]:
    try:
        registry = Registry.open(cfg.registry)
        entries = registry.entries()
        bad = registry.verify()
    except (RegistryError, OSError) as exc:
        raise ConfigError(f"registry {cfg.registry}: {exc}") from exc
    if bad:
        raise ConfigError(f"registry {cfg.registry} fails its hashes: {'; '.join(bad)}")
    models: dict[str, dict[str, ModelEntry]] = {}
    for e in entries:
        models.setdefault(e.name, {})[e.version] = e
    return models


def build_policy(cfg: Config, models: dict[str, dict[str, ModelEntry]]) -> LivePolicy:
    latest = {name: v[max(v, key=int)] for name, v in models.items()}
    try:
        if cfg.policy.dir is not None:
            return LivePolicy(dir_loader(cfg, latest), watch=[cfg.policy.dir])
        if cfg.policy.bundle is not None:
            return LivePolicy(bundle_loader(cfg, latest))
    except (PolicyError, ReloadRefused, OSError) as exc:
        raise ConfigError(f"policy: {exc}") from exc
    # Deny by default goes as far as refusing to start without a policy.
    raise ConfigError("no policy: set policy.dir (dev) or policy.bundle")


def token(cfg: Config) -> Token:
    """The [pkcs11] token (config.py checked that module and pin_file are set)."""
    t = cfg.pkcs11
    if t.module is None or t.pin_file is None:
        raise ConfigError("[pkcs11] needs module and pin_file")
    return Token(t.module, t.pin_file, t.token, t.slot)


def receipt_signers(cfg: Config) -> tuple[Signer, Signer] | None:
    """The receipt-signing and log-checkpoint keys, from files or the token."""
    r = cfg.receipts
    try:
        if r.signer == "pkcs11" and r.signing_key_label and r.log_key_label:
            where = token(cfg)
            keys: tuple[Signer, Signer] = (
                Pkcs11Signer(where, r.signing_key_label),
                Pkcs11Signer(where, r.log_key_label),
            )
        elif r.signing_key is not None and r.log_key is not None:
            keys = FileSigner(r.signing_key), FileSigner(r.log_key)
        else:
            return None
    except SignerError as exc:
        raise ConfigError(f"receipts: {exc}") from exc
    if keys[0].public_key() == keys[1].public_key():
        raise ConfigError("receipts: the log key must differ from the receipt signing key")
    return keys


def open_receipts(cfg: Config, worker: Worker | None = None) -> ReceiptService | None:
    """The replica's receipt log; one of a replica's worker processes keeps its own log,
    `<receipts dir>/w<i>/`, and reads the others' (gateway/supervisor.py)."""
    r = cfg.receipts
    keys = receipt_signers(cfg)
    if keys is None:
        return None
    base = r.dir or cfg.data_dir / "receipts"
    from gateway.receipts.checkpointer import WitnessClient
    from gateway.receipts.note import WitnessKey

    try:
        witnesses = [
            WitnessClient(WitnessKey.from_vkey(vkey), url, vault=url in r.reconcile_with)
            for vkey, url in r.witnesses
        ]
        service = ReceiptService.open(
            base if worker is None else worker.receipts_dir(base),
            *keys,
            f"{cfg.trust_domain}/{cfg.site}/receipts",
            r.checkpoint_interval_s,
            witnesses,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"receipts: {exc}") from exc
    if worker is not None:
        from gateway.receipts.siblings import SiblingLogs

        service.siblings = SiblingLogs(worker.siblings(base))
    return service


def add_retention(cfg: Config, gw: Gateway, worker: Worker | None = None) -> None:
    """The receipt retention job (`gateway.receipts.retention`), where configured."""
    receipts = gw.receipts
    if receipts is None:
        return
    policy = cfg.receipts.retention
    if policy.body_days is None:
        log.info(
            "receipt bodies are kept indefinitely: set receipts.retention.body_days to "
            "erase them after a retention period"
        )
    if not policy.enabled:
        return
    from gateway.receipts.retention import RetentionJob

    # Its own logs, and worker 0 (or the one process) the logs no process writes; another
    # worker's log is that worker's to erase from.
    logs: Callable[[], Sequence[ReceiptLog]] = receipts.own_logs
    if worker is None or worker.index == 0:
        from gateway.receipts.siblings import UnownedLogs, unowned_dirs

        base = cfg.receipts.dir or cfg.data_dir / "receipts"
        unowned = UnownedLogs(unowned_dirs(base, 1 if worker is None else worker.count))

        def with_unowned() -> list[ReceiptLog]:
            return [*receipts.own_logs(), *unowned()]

        logs = with_unowned
    job = RetentionJob(logs, policy, gw.metrics.registry)
    gw.background.append(job.run)


DECISIONS_LOGGER = "ztgate.decisions"


class DecisionFileHandler(logging.handlers.RotatingFileHandler):
    """The decision log's file: one JSON line per record, rotated by size. A line is never
    split: the handler rotates before a line that would take the file to max_bytes."""


def configure_decision_log(setting: Logging) -> DecisionFileHandler | None:
    """Send the decision log where `[logging] decisions` says.

    ``stderr``: the logger propagates to the root handler (the process's stderr, for the
    container's log shipper), as before. ``file:<path>``: a size-rotated file of bare JSON
    lines, and nothing to stderr (the decisions are shipped from the file, once). Calling
    it again replaces the handler it installed, never doubles it."""
    logger = logging.getLogger(DECISIONS_LOGGER)
    for old in [h for h in logger.handlers if isinstance(h, DecisionFileHandler)]:
        logger.removeHandler(old)
        old.close()
    path = setting.decisions_file
    if path is None:
        logger.setLevel(logging.NOTSET)  # the process's level, like every other logger
        logger.propagate = True
        return None
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handler = DecisionFileHandler(
            path,
            maxBytes=setting.decisions_max_bytes,
            backupCount=setting.decisions_backups,
            encoding="utf-8",
        )
    except OSError as exc:
        raise ConfigError(f"logging.decisions: cannot open {path}: {exc}") from exc
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    # Decisions are INFO records: they are kept whatever level the rest of the process
    # logs at, and go to the file only.
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler


def srs_refusals(artefacts: Iterable[VerifierArtefacts], pinned: Sequence[str]) -> list[str]:
    """zk records production must not serve: a development SRS, or one not pinned."""
    pins = {p.lower() for p in pinned}
    out = []
    for found in artefacts:
        rec = found.record
        if rec.dev_srs:
            out.append(
                f"zk model {rec.name} was onboarded with a locally generated SRS (its maker "
                "could forge proofs); onboard it again with a public ceremony SRS "
                "(ztgate zk onboard --srs FILE --srs-sha256 HASH)"
            )
        elif rec.srs_sha256.lower() not in pins:
            out.append(
                f"zk model {rec.name} uses SRS {rec.srs_sha256}, which zk.srs_sha256 does not "
                "pin; check it is the ceremony file and add its SHA-256 there"
            )
    return out


def _onboarded_zk(cfg: Config) -> list[str]:
    from zk.repository import ZK_DIR, onboarded

    if not (cfg.registry / ZK_DIR).is_dir():
        return []
    try:
        entries = Registry.open(cfg.registry).entries()
    except RegistryError:
        return []
    return [str(d) for _, d in onboarded(cfg.registry, entries)]


def add_proof_modes(cfg: Config, gw: Gateway, nodes: Sequence[NodeConfig]) -> None:
    """zk and mpc, where configured; each owns worker processes for the gateway's lifetime.

    `nodes` are the nodes as the policy's facts say (Loaded.nodes): MPC parties are
    chosen among them, one per signed provider."""
    # zk: the dirs configured, and every registered model onboarded beside the registry
    # (`ztgate zk onboard NAME`): no list to keep by hand.
    zk_dirs = list(dict.fromkeys([*map(str, cfg.zk.artefacts), *_onboarded_zk(cfg)]))
    if zk_dirs:
        from gateway.verify.zk import ZkVerification
        from zk.record import ZkError
        from zk.verifier import ZkVerifierPool

        pool = ZkVerifierPool(cfg.zk.workers, cache_dir=cfg.data_dir / "ezkl")
        try:
            zk = ZkVerification.from_dirs(zk_dirs, pool, seal_into=cfg.data_dir / "zk-sealed")
        except (OSError, ValueError, ZkError) as exc:
            pool.close()
            raise ConfigError(f"zk.artefacts: {exc}") from exc
        if cfg.mode == "production":
            refused = srs_refusals(zk.artefacts.values(), cfg.zk.srs_sha256)
            if refused:
                pool.close()
                raise ProductionRefused("production mode refuses: " + "; ".join(refused))
        gw.verifiers["zk"] = zk
        from zk.lazy import install as install_lazy_proofs

        install_lazy_proofs(gw, zk)  # @proof("lazy") answers (docs/zk.md, "Lazy proofs")

        async def zk_pool(stop: asyncio.Event) -> None:
            await pool.warm()
            await stop.wait()
            pool.close()

        gw.background.append(zk_pool)
    parties = {n.name: n.mpc_address for n in nodes if n.mpc_address}
    if cfg.mpc.dealer_cert is not None and cfg.mpc.dealer_key is not None and parties:
        from gateway.verify.mpc import MpcVerification
        from mpc.session import MpcSettings

        settings = MpcSettings(
            trust_domain=cfg.trust_domain,
            node_ca=cfg.tls.node_ca,
            client_cert=cfg.tls.node_client_cert,
            client_key=cfg.tls.node_client_key,
            dealer_cert=cfg.mpc.dealer_cert,
            dealer_key=cfg.mpc.dealer_key,
            dealer_listen=cfg.mpc.dealer_listen,
            dealer_advertise_host=cfg.mpc.dealer_advertise_host,
            request_timeout_s=cfg.mpc.deadline_s,
        )
        verifier = MpcVerification(settings, parties, parties=cfg.mpc.parties)
        gw.verifiers["mpc"] = verifier

        async def mpc_sessions(stop: asyncio.Event) -> None:
            await stop.wait()
            await verifier.close()

        gw.background.append(mpc_sessions)


def build_gateway(cfg: Config, worker: Worker | None = None) -> Gateway:
    """The gateway; `worker`: one of several processes serving one replica."""
    check_mode(cfg)
    models = load_models(cfg)
    policy = build_policy(cfg, models)
    creds = NodeCredentials(cfg.tls.node_ca, cfg.tls.node_client_cert, cfg.tls.node_client_key)
    channel_creds = creds.channel_credentials()
    # The nodes as the policy's facts say they are, not as gateway.toml says: with a signed
    # bundle, each channel is pinned to the signed DNS SAN and routing, the verifiers and
    # receipts see the signed region and provider (gateway.policy.live.signed_nodes).
    nodes = policy.current.nodes
    clients = [NodeClient(n, channel_creds, cfg.limits.max_output_bytes) for n in nodes]
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(
        cfg.state.redis_url,
        cfg.data_dir,
        cfg.state.timeout_s,
        processes=1 if worker is None else worker.count,
    )
    revoked = "revoked.jsonl" if worker is None else worker.revocations_file
    from gateway.supervisor import merge_revocations

    merge_revocations(cfg.data_dir, revoked)  # the workers' files, with one process or many
    revocations = Revocations(
        store,
        cfg.data_dir / revoked,
        clock=PersistedClock(cfg.data_dir / "clock.json"),
        crl=cfg.tls.crl,
        client_ca=cfg.tls.client_ca,
    )
    router = Router.from_clients(clients, store, cfg.routing)
    router.site = cfg.site  # hybrid sites: this site's nodes first (gateway.forward.site)
    ca = x509.load_pem_x509_certificates(cfg.tls.client_ca.read_bytes())
    resolver = IdentityResolver(cfg.trust_domain, [c.subject for c in ca])
    gw = Gateway(
        cfg,
        models,
        router,
        resolver,
        Gateway.default_verifiers(cfg),
        policy=policy,
        store=store,
        revocations=revocations,
        receipts=open_receipts(cfg, worker),
    )

    async def sync_revocations(stop: asyncio.Event) -> None:
        await revocations.run(cfg.state.revocation_sync_s, stop)

    async def watch_policy(stop: asyncio.Event) -> None:
        while not stop.is_set():
            if policy.changed() and policy.reload():
                gw.policy_changed()
                await gw.record("policy_load", policy.engine.source.hash.encode())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=cfg.policy.watch_interval_s)

    def relabel(loaded: Loaded) -> None:
        # A reloaded bundle may re-sign a node's region, provider or trust; LivePolicy
        # refused it already if it changed a name or a pin, so only the labels move here.
        signed = {n.name: n for n in loaded.nodes}
        for state in router.nodes.values():
            state.client.node = signed[state.client.node.name]

    policy.listeners.append(relabel)
    add_proof_modes(cfg, gw, nodes)
    add_retention(cfg, gw, worker)
    add_lie_accounting(cfg, gw)
    gw.background.append(sync_revocations)
    if cfg.policy.dir is not None:
        gw.background.append(watch_policy)
    elif worker is not None:
        gw.background.append(follow_pushes(cfg, gw))
    add_uplink(cfg, gw)
    return gw


def follow_pushes(cfg: Config, gw: Gateway) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
    """A replica's workers: a bundle pushed to one worker (`/admin/reload`) is kept in the
    shared data dir (gateway.policy.live.ACCEPTED_BUNDLE); every other worker loads it
    from there, verified as at a start, so no worker keeps serving the older policy."""
    from gateway.policy.live import ACCEPTED_BUNDLE

    accepted = cfg.data_dir / ACCEPTED_BUNDLE

    def stamp() -> tuple[int, int] | None:
        try:
            st = accepted.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    async def follow(stop: asyncio.Event) -> None:
        # Never a stamp: the first pass reloads, for a bundle pushed to another worker
        # while this one started, or a SIGHUP it ignored then (gateway/supervisor.py).
        seen: tuple[int, int] | bool | None = False
        while not stop.is_set():
            now = stamp()
            if now != seen:
                seen = now
                before = gw.policy.current.version  # a version is one content (live.py)
                # The pushing worker itself, and a worker already on it, find nothing new.
                if gw.policy.reload() and gw.policy.current.version != before:
                    gw.policy_changed()
                    await gw.record("policy_load", gw.policy.engine.source.hash.encode())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=cfg.policy.watch_interval_s)

    return follow


def add_uplink(cfg: Config, gw: Gateway) -> None:
    """An edge site pulling from its core (`[uplink]`, gateway/uplink.py): the CRL first,
    then the signed bundle (loaded as a push would be: signatures, no rollback) and model
    files. The log's upload to the core waits until the CRL was pulled (revocations
    first after a reconnection)."""
    if cfg.uplink.core_url is None:
        return
    from gateway.uplink import Uplink, UplinkError

    uplink = Uplink(cfg)

    async def crl_signed(path: Path) -> bool:
        from gateway.revocation import crl_signed_by

        return await asyncio.to_thread(crl_signed_by, path, cfg.tls.client_ca)

    async def bundle_loads(path: Path) -> bool:
        # Loaded as a push is (officer signatures, no rollback) before it is installed.
        if not gw.policy.reload(bundle=await asyncio.to_thread(path.read_bytes)):
            return False
        gw.policy_changed()
        await gw.record("policy_load", gw.policy.engine.source.hash.encode())
        return True

    uplink.checks = {"crl": crl_signed, "bundle": bundle_loads}
    # Revocations are as fresh as the last CRL pulled from the core, not as the local
    # store's answers (which an edge cut off from its core keeps getting).
    gw.revocations.fresh_from_store = False
    if gw.receipts is not None:
        for w in gw.receipts.witnesses:
            if w.vault:
                w.ready = uplink.revocations_current

    async def pull_from_core(stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    installed = await uplink.pull()
                except (UplinkError, httpx.HTTPError, OSError) as exc:
                    uplink.failures += 1
                    log.warning("uplink: pull from the core failed: %s", exc)
                    installed = []
                if any(name.endswith(".crl") for name in installed):
                    await asyncio.to_thread(gw.revocations.learn_crl)
                if uplink.revocations_current(within_s=uplink.interval_s):
                    gw.revocations.clock.synced()  # the core's CRL, pulled this round
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=uplink.interval_s)
        finally:
            await uplink.aclose()

    gw.background.append(pull_from_core)


def close_unserved(gw: Gateway) -> None:
    """Close what `build_gateway` opened, for a gateway that never served (`serve --check`):
    the revocation file's lock, the state store, the receipt logs, worker pools. A gateway
    that served is closed by the API's lifespan instead. No final checkpoint is signed and
    no witness is asked: nothing was logged."""

    async def close() -> None:
        await gw.router.close()
        await gw.store.close()
        if "mpc" in gw.verifiers:
            from gateway.verify.mpc import MpcVerification

            mpc = gw.verifiers["mpc"]
            if isinstance(mpc, MpcVerification):
                await mpc.close()

    try:
        asyncio.run(close())
    finally:
        gw.revocations.close()
        gw.decode_pool.close()
        if "zk" in gw.verifiers:
            from gateway.verify.zk import ZkVerification

            zk = gw.verifiers["zk"]
            if isinstance(zk, ZkVerification):
                zk.pool.close()
        if gw.receipts is not None:
            gw.receipts.closed = True
            for rl in gw.receipts.own_logs():
                rl.close_sync()


def tls_files(cfg: Config) -> TLSFiles:
    return TLSFiles(cfg.tls.cert, cfg.tls.key, cfg.tls.client_ca, cfg.tls.crl)


def servers(cfg: Config, gw: Gateway) -> list[uvicorn.Server]:
    tls = ReloadingContext(tls_files(cfg))

    async def watch_tls(stop: asyncio.Event) -> None:
        await tls.watch(cfg.tls.reload_interval_s, stop)

    gw.background.append(watch_tls)
    if cfg.listen.grpc_port is not None:
        # The gRPC front lives and drains with the API's lifespan, on the same certificates.
        from gateway.grpc_front import GrpcServer

        gw.background.append(GrpcServer(cfg, gw, tls).run)
    app = build_api(gw)  # once: it owns the gateway's lifespan (and the jobs service)
    listener = getattr(gw, "forward_listener", None)
    if listener is not None:
        listener.api = app  # forwarded requests enter this very app as the client
    api = uvicorn.Config(
        edge_failover(cfg, gw, app),
        host=cfg.listen.host,
        port=cfg.listen.port,
        loop="uvloop",
        http=tls_protocol(cfg.limits.header_timeout_s, cfg.limits.idle_timeout_s),
        ssl_context_factory=lambda _cfg, _default: tls.listening,
        ssl_certfile=str(cfg.tls.cert),  # uvicorn decides "is TLS" by this; context wins
        timeout_graceful_shutdown=cfg.listen.graceful_shutdown_s,
        access_log=False,
        server_header=False,
        # Zero trust: nothing a peer writes in X-Forwarded-* may change who or where it is.
        proxy_headers=False,
        lifespan="on",
    )
    admin = uvicorn.Config(
        build_admin(gw),
        host=cfg.listen.admin_host,
        port=cfg.listen.admin_port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        proxy_headers=False,
        lifespan="off",
        timeout_graceful_shutdown=cfg.listen.graceful_shutdown_s,
    )
    return [uvicorn.Server(api), uvicorn.Server(admin)]


def edge_failover(cfg: Config, gw: Gateway, api: Any) -> Any:
    """An edge that forwards to its core (`forward.core_url`): the API app, failing over to
    the core when no local node can serve (gateway/forward/client.py)."""
    f = cfg.forward
    if f.core_url is None or f.cert is None or f.key is None or f.core_ca is None:
        return api
    from gateway.forward.client import CoreForwarder, EdgeFailover

    forwarder = CoreForwarder(
        site=cfg.site,
        trust_domain=cfg.trust_domain,
        core_url=f.core_url,
        core_site=f.core_site,
        cert=f.cert,
        key=f.key,
        core_ca=f.core_ca,
        timeout_s=f.timeout_s,
    )

    async def close_forwarder(stop: asyncio.Event) -> None:
        await stop.wait()
        await forwarder.aclose()

    gw.background.append(close_forwarder)
    gw.forwarder = forwarder  # type: ignore[attr-defined]
    failover = EdgeFailover(api, forwarder, cfg.limits.max_body_bytes, cfg.generate)
    if gw.jobs is not None:  # jobs lean on the core as sync calls do (docs/ddil.md)
        gw.jobs.app = failover
    return failover


def forward_server(cfg: Config, gw: Gateway) -> uvicorn.Server | None:
    """The core's forward listener (`forward.port`): TLS 1.3 with the forwarder CA as its
    whole trust store, so a client certificate fails the handshake there, as a forwarder
    certificate does on the API listener (gateway/forward/listener.py). Call it before
    `servers`, which hands it the API app."""
    f = cfg.forward
    if f.port is None or f.ca is None:
        return None
    from gateway.forward.limits import SiteLimits
    from gateway.forward.listener import ForwardListener
    from gateway.forward.metrics import ForwardMetrics

    # Reloaded like the API's: a new forward.crl takes effect at the next handshake.
    tls = ReloadingContext(TLSFiles(cfg.tls.cert, cfg.tls.key, f.ca, f.crl))

    async def watch_tls(stop: asyncio.Event) -> None:
        await tls.watch(cfg.tls.reload_interval_s, stop)

    gw.background.append(watch_tls)

    def may_forward(identity: IdentityFacts, site: str, model: str) -> bool:
        decision = gw.policy.engine.decide_forward_for(identity, site, model)
        if not decision.allowed:
            log.warning("forward_for denied for site %s: %s", site, decision.reason)
        return decision.allowed

    listener = ForwardListener(
        None,  # the API app, attached by `servers` (call this first)
        trust_domain=cfg.trust_domain,
        site=cfg.site,
        client_ca=cfg.tls.client_ca,
        max_skew_s=f.max_skew_s,
        nonce_ttl_s=f.nonce_ttl_s,
        max_body_bytes=cfg.limits.max_body_bytes,
        check_nonce=gw.store.check_nonce,
        may_forward=may_forward,
        resolve=gw.resolver.resolve,
        limits=SiteLimits(f.site_rate_per_s, f.site_burst, f.site_concurrency),
        crl=f.crl,  # also checked per request: a connection outlives its handshake
        forwarder_ca=f.ca,
        # An edge's job runs here as a job (one receipt per job), once the key is read.
        jobs_key=lambda: b"" if gw.jobs is None else gw.jobs.key,
    )
    gw.forward_listener = listener  # type: ignore[attr-defined]
    gw.metrics.registry.register(ForwardMetrics(listener))
    return uvicorn.Server(
        uvicorn.Config(
            listener,
            host=f.host,
            port=f.port,
            loop="uvloop",
            http=tls_protocol(cfg.limits.header_timeout_s, cfg.limits.idle_timeout_s),
            ssl_context_factory=lambda _cfg, _default: tls.listening,
            ssl_certfile=str(cfg.tls.cert),
            timeout_graceful_shutdown=cfg.listen.graceful_shutdown_s,
            # Every site's requests together; each site's own share is `SiteLimits`'.
            limit_concurrency=f.max_connections,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            lifespan="off",
        )
    )


async def serve(
    cfg: Config, worker: Worker | None = None, started: Callable[[], None] | None = None
) -> None:
    """Serve until SIGTERM/SIGINT. `worker`: one of a replica's processes, serving the
    sockets its supervisor bound (gateway/supervisor.py); `started` is called once the
    API listens."""
    configure_logging(cfg.logging.level, cfg.logging.format)
    configure_decision_log(cfg.logging if worker is None else worker.decision_log(cfg.logging))
    try:
        setup_tracing()  # the standard OTEL_* variables; off unless OTEL_TRACES_EXPORTER
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    gw = build_gateway(cfg, worker)
    forward = forward_server(cfg, gw)  # before `servers`: its TLS watch joins the jobs
    api, admin = servers(cfg, gw)
    sockets: dict[str, list[socket.socket] | None] = {"api": None, "admin": None, "forward": None}
    if worker is not None:
        sockets = {name: [sock] for name, sock in worker.sockets.items()}
        if gw.jobs is not None:
            gw.jobs.runs_jobs = worker.runs_jobs or bool(cfg.state.redis_url)
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_policy, gw)
    # Only the API server owns the signal handlers; the others follow it down.
    followers = [admin] if forward is None else [admin, forward]
    for follower in followers:
        follower.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    api_task = asyncio.create_task(api.serve(sockets["api"]))
    # The probes listen only once the API does: the API binds its port after its lifespan
    # startup, and a replica the orchestrator sees ready must accept connections.
    while not api.started and not api_task.done():
        await asyncio.wait([api_task], timeout=0.02)  # uvicorn sets `started`, no event
    tasks = [asyncio.create_task(admin.serve(sockets.get("admin")))]
    if forward is not None:
        tasks.append(asyncio.create_task(forward.serve(sockets.get("forward"))))
    if api.started and started is not None:
        started()
    try:
        await api_task
    finally:
        for follower in followers:
            follower.should_exit = True
        await asyncio.wait(tasks, timeout=cfg.listen.graceful_shutdown_s + 1)
        shutdown_tracing()  # flush what the exporters still hold


def reload_policy(gw: Gateway) -> None:
    """SIGHUP: load the policy anew now (a bundle pushed to one worker, a changed dir)."""

    async def reload() -> None:
        if gw.policy.reload():  # on the loop, as the policy watch reloads it
            gw.policy_changed()
            await gw.record("policy_load", gw.policy.engine.source.hash.encode())

    task = asyncio.ensure_future(reload())
    _reloads.add(task)
    task.add_done_callback(_reloads.discard)


_reloads: set[asyncio.Future[None]] = set()


def run(
    cfg: Config, worker: Worker | None = None, started: Callable[[], None] | None = None
) -> None:
    import uvloop

    uvloop.run(serve(cfg, worker, started))
