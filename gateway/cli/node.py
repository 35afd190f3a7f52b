"""`ztgate node`: run an inference node (tritonserver behind gRPC mTLS) under supervision."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from gateway.cli import Progress, UsageError, emit, json_option
from gateway.pki import DEFAULT_SITE, PKI, PKIError
from gateway.ports import free_port as _free_port

log = logging.getLogger("ztgate.node")


def register(sub: Any) -> None:
    p = sub.add_parser("node", help="inference nodes: tritonserver behind gRPC mTLS")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    serve = verbs.add_parser(
        "serve", help="serve models on gRPC mTLS until SIGINT/SIGTERM, restarting on failure"
    )
    serve.add_argument("--name", required=True, help="node name (its cert: <name>.node.<td>)")
    serve.add_argument("--region", required=True)
    serve.add_argument("--provider", required=True)
    serve.add_argument("--grpc-port", type=int, required=True)
    serve.add_argument(
        "--grpc-host", default="127.0.0.1", help="gRPC bind address (default 127.0.0.1)"
    )
    serve.add_argument(
        "--http-port", type=int, help="loopback-only HTTP for health checks (default: any free)"
    )
    serve.add_argument(
        "--pki", type=Path, help="a `ztgate pki` directory (development): the node's cert from it"
    )
    serve.add_argument("--site", default=DEFAULT_SITE, help="whose gateway may call this node")
    serve.add_argument(
        "--cert", type=Path, help="node certificate chain (PEM), from your own node CA; not --pki"
    )
    serve.add_argument("--key", type=Path, help="its private key (PEM)")
    serve.add_argument(
        "--gateway-ca",
        type=Path,
        metavar="PEM",
        help="the site's gateway CA: the only callers this node accepts (--grpc-root-cert)",
    )
    src = serve.add_mutually_exclusive_group(required=True)
    src.add_argument("--registry", type=Path, help="build the model repository from here")
    src.add_argument("--repository", type=Path, help="serve this ready Triton repository")
    serve.add_argument("--models", help="comma-separated model names (with --registry)")
    serve.add_argument("--workdir", type=Path, help="default .ztgate/nodes/<name>")
    serve.add_argument("--triton-home", type=Path, help="default <workdir>/triton-home")
    serve.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    serve.add_argument("--start-deadline", type=float, default=30.0, metavar="SECONDS")
    serve.add_argument("--check-interval", type=float, default=2.0, metavar="SECONDS")
    serve.add_argument("--max-restarts", type=int, default=5, help="per 5 minutes")
    serve.add_argument(
        "--token-delay-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="generative models sleep this long per token (benchmarks of a slow model)",
    )
    serve.add_argument(
        "--zk-artefacts",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="`ztgate zk onboard` output: also serve <model>-zk, which proves (repeatable)",
    )
    json_option(serve)
    serve.set_defaults(func=_serve)

    repo = verbs.add_parser(
        "repository", help="write a Triton model repository from the registry (e.g. for GPU nodes)"
    )
    repo.add_argument("--registry", type=Path, required=True)
    repo.add_argument("--out", type=Path, required=True)
    repo.add_argument("--models", help="comma-separated model names (default: all)")
    repo.add_argument(
        "--flavour",
        choices=("python", "onnxruntime", "vllm"),
        default="onnxruntime",
        help="onnxruntime: NVIDIA's Triton image; python: the wheel's tritonserver; "
        "vllm: Triton's vLLM backend for generative models (needs --vllm-model)",
    )
    repo.add_argument(
        "--vllm-model",
        metavar="REF",
        help="with --flavour vllm: the Hugging Face model id or directory vLLM loads",
    )
    repo.add_argument("--zk-artefacts", type=Path, action="append", default=[], metavar="DIR")
    json_option(repo)
    repo.set_defaults(func=_repository)


def _labels(raw: list[str]) -> dict[str, str]:
    labels = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--label {item!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def _build_repository(args: argparse.Namespace, workdir: Path) -> Path:
    if args.repository is not None:
        if args.models:
            raise UsageError("--models needs --registry")
        if not args.repository.is_dir():
            raise UsageError(f"--repository {args.repository} is not a directory")
        return Path(args.repository).absolute()
    repo = _from_registry(args.registry, args.models, workdir / "repository", "python")
    _add_zk(repo, args.registry, args.zk_artefacts, args.models)
    return repo


def _add_zk(
    repo: Path, registry: Path, dirs: list[Path], models: str | None = None, onboarded: bool = True
) -> None:
    """Serve `<name>-zk` (prove as well as answer) for each served model onboarded beside
    the registry (`ztgate zk onboard NAME`), and for each onboarded model given."""
    from gateway.registry import Registry, RegistryError
    from zk.record import ZkError, load_record
    from zk.repository import add_onboarded, add_zk_model

    if onboarded:
        wanted = {m.strip() for m in (models or "").split(",") if m.strip()}
        try:
            entries = Registry.open(registry).entries()
            served = [e for e in entries if not wanted or e.name in wanted]
            add_onboarded(repo, registry, served)
        except (ZkError, RegistryError, OSError) as exc:
            raise UsageError(f"serving onboarded zk models: {exc}") from exc

    for d in dirs:
        try:
            record = load_record(d / "zk.json")
            entry = next(
                (e for e in Registry.open(registry).entries() if e.sha256 == record.model_sha256),
                None,
            )
            if entry is None:
                raise UsageError(f"--zk-artefacts {d}: its model is not in {registry}")
            add_zk_model(repo, entry.name, d, entry)
        except (ZkError, RegistryError, OSError) as exc:
            raise UsageError(f"--zk-artefacts {d}: {exc}") from exc


def _repository(args: argparse.Namespace) -> int:
    if (args.flavour == "vllm") != bool(args.vllm_model):
        raise UsageError("--vllm-model goes with --flavour vllm, and only with it")
    out = _from_registry(args.registry, args.models, args.out, args.flavour, args.vllm_model)
    if args.zk_artefacts and args.flavour != "python":
        raise UsageError("--zk-artefacts needs --flavour python (the prover is a python model)")
    _add_zk(out, args.registry, args.zk_artefacts, args.models, args.flavour == "python")
    text = f"{args.flavour} repository written to {out}"
    emit(args, {"repository": str(out), "flavour": args.flavour}, text)
    return 0


def _from_registry(
    registry: Path, models: str | None, out: Path, flavour: str, vllm_model: str | None = None
) -> Path:
    from gateway.node.repository import RepositoryError, build_repository
    from gateway.registry import Registry, RegistryError

    try:
        entries = Registry.open(registry).entries()
        if models:
            wanted = [m.strip() for m in models.split(",") if m.strip()]
            unknown = sorted(set(wanted) - {e.name for e in entries})
            if unknown:
                raise UsageError(f"--models: not in {registry}: {', '.join(unknown)}")
            entries = [e for e in entries if e.name in wanted]
        if not entries:
            raise UsageError(f"no models to serve in {registry}")
        return build_repository(
            entries,
            out,
            flavour=flavour,  # type: ignore[arg-type]
            vllm_model=vllm_model,
        )
    except (RegistryError, RepositoryError) as exc:
        raise UsageError(str(exc)) from exc


@dataclass(frozen=True)
class _Identity:
    """The certificate a node serves gRPC with, and the one CA whose holders may call it."""

    cert: Path
    key: Path
    gateway_ca: Path
    dns_name: str
    spiffe_id: str
    trusts: str


def _identity(args: argparse.Namespace) -> _Identity:
    """From --pki (the development PKI), or from --cert/--key/--gateway-ca (your own PKI)."""
    own = {"--cert": args.cert, "--key": args.key, "--gateway-ca": args.gateway_ca}
    given = [flag for flag, value in own.items() if value is not None]
    if args.pki is not None:
        if given:
            raise UsageError(f"--pki and {', '.join(given)} exclude each other")
        try:
            pki = PKI.open(args.pki)
            if args.site not in pki.sites:
                sites = ", ".join(pki.sites)
                raise UsageError(f"--site {args.site!r} is not in {args.pki} ({sites})")
            issued = pki.ensure("node", args.name)
        except PKIError as exc:
            raise UsageError(str(exc)) from exc
        return _Identity(
            issued.cert.absolute(),
            issued.key.absolute(),
            pki.gateway_ca_bundle(args.site).absolute(),
            pki.node_dns_name(args.name),
            issued.spiffe_id,
            f"gateway CA of site {args.site}",
        )
    if len(given) != len(own):
        missing = ", ".join(flag for flag, value in own.items() if value is None)
        raise UsageError(f"give --pki, or --cert, --key and --gateway-ca (missing {missing})")
    return _own_identity(args.cert, args.key, args.gateway_ca)


def _own_identity(cert_path: Path, key_path: Path, ca_path: Path) -> _Identity:
    """Check the files a node would hand to tritonserver (which reports a missing or bad
    file only as a port already in use), and read the names the gateway must pin."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from gateway.certfiles import CertFileError, is_ca, load_leaf

    try:
        own = load_leaf(cert_path, key_path)
        cas = x509.load_pem_x509_certificates(ca_path.read_bytes())
    except CertFileError as exc:
        raise UsageError(str(exc)) from exc
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"node certificate, key or gateway CA unreadable: {exc}") from exc
    if ExtendedKeyUsageOID.SERVER_AUTH not in own.eku:
        raise UsageError(f"--cert {cert_path}: lacks the serverAuth extendedKeyUsage")
    dns = own.san.get_values_for_type(x509.DNSName)
    if not dns:
        raise UsageError(f"--cert {cert_path}: no DNS name for the gateway to pin")
    spiffe = own.san.get_values_for_type(x509.UniformResourceIdentifier)
    if not any(is_ca(ca) for ca in cas):
        raise UsageError(f"--gateway-ca {ca_path}: no CA certificate in it")
    return _Identity(
        cert_path.absolute(),
        key_path.absolute(),
        ca_path.absolute(),
        dns[0],
        next((u for u in spiffe if u.startswith("spiffe://")), "-"),
        "the gateway CA given",
    )


def _serve(args: argparse.Namespace) -> int:
    from gateway.node.triton import (
        NodeSpec,
        NodeStartError,
        NodeSupervisor,
        TritonNotInstalled,
        TritonProcess,
    )

    workdir = (args.workdir or Path(".ztgate/nodes") / args.name).absolute()
    labels = _labels(args.label)
    identity = _identity(args)
    progress = Progress.of(args, f"node {args.name}")
    if args.registry is not None:
        progress("building the model repository")
    repository = _build_repository(args, workdir)
    spec = NodeSpec(
        name=args.name,
        region=args.region,
        provider=args.provider,
        grpc_port=args.grpc_port,
        http_port=args.http_port or _free_port(),
        repository=repository,
        cert=identity.cert,
        key=identity.key,
        client_ca=identity.gateway_ca,
        workdir=workdir,
        labels=labels,
        grpc_host=args.grpc_host,
    )
    if not 0 <= args.token_delay_ms <= 10_000:
        raise UsageError("--token-delay-ms must be between 0 and 10000")
    process = TritonProcess(
        spec,
        args.triton_home.absolute() if args.triton_home else None,
        env={"ZTGATE_TOKEN_DELAY_MS": str(args.token_delay_ms)} if args.token_delay_ms else None,
    )
    process.progress = progress
    supervisor = NodeSupervisor(
        process,
        interval_s=args.check_interval,
        start_deadline_s=args.start_deadline,
        max_restarts=args.max_restarts,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("node %s: %s, stopping", args.name, signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            took = supervisor.start()
        except (NodeStartError, TritonNotInstalled) as exc:
            print(f"ztgate: node {args.name} failed to start: {exc}", file=sys.stderr)
            return 1
        finally:
            process.progress = None  # restarts are the supervisor's, logged
        progress.done("ready", took)
        data = {
            "name": spec.name,
            "ready_s": round(took, 3),
            "region": spec.region,
            "provider": spec.provider,
            "grpc_address": spec.grpc_address,
            "dns_name": identity.dns_name,
            "spiffe_id": identity.spiffe_id,
            "trusts": str(spec.client_ca),
            "repository": str(spec.repository),
            "log": str(supervisor.process.log_path),
        }
        text = "\n".join(
            [
                f"node {spec.name} ready in {took:.2f}s ({spec.region}, {spec.provider})",
                f"  gRPC (mTLS):  {spec.grpc_address}",
                f"  pin DNS name: {identity.dns_name}   (grpc.ssl_target_name_override)",
                f"  SPIFFE ID:    {identity.spiffe_id}",
                f"  trusts:       {spec.client_ca}  ({identity.trusts})",
                f"  repository:   {spec.repository}",
                f"  log:          {supervisor.process.log_path}",
            ]
        )
        emit(args, data, text)
        sys.stdout.flush()  # a reader waits for it (a pipe is block-buffered)
        # Serving has no natural end; the loop ends on a signal or when supervision gives up.
        while not stop.wait(1.0):
            if supervisor.state == "failed":
                print(
                    f"ztgate: node {args.name} gave up: {supervisor.last_reason}", file=sys.stderr
                )
                return 1
        return 0
    finally:
        supervisor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("node %s stopped (restarts: %d)", args.name, supervisor.restarts)
