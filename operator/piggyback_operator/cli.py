"""`piggyback-operator`: run the operator, or print the CRD generated from the API models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from piggyback_operator.api import crd_yaml


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="piggyback-operator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="reconcile LLMServices (in a pod: in-cluster credentials; else kubeconfig)")
    run.add_argument("--namespace", "-n", action="append", default=[],
                     help="watch only this namespace (repeatable; glob patterns allowed); default: all namespaces")
    run.add_argument("--probe-port", type=int, default=8080, help="liveness endpoint: http://0.0.0.0:PORT/healthz")
    run.add_argument("--metrics-port", type=int, default=9090, help="the operator's own Prometheus /metrics")
    run.add_argument("--log-format", choices=["plain", "full", "json"], default="full")
    run.add_argument("--verbose", action="store_true")
    crd = sub.add_parser("crd", help="print the LLMService CRD generated from operator/piggyback_operator/api.py")
    crd.add_argument("--output", "-o", type=Path, help="write to this file instead of stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "crd":
        if args.output:
            args.output.write_text(crd_yaml())
        else:
            sys.stdout.write(crd_yaml())
        return 0

    import kopf
    from prometheus_client import start_http_server

    import piggyback_operator.handlers  # noqa: F401  (registers the handlers with kopf)
    from piggyback_operator.telemetry import REGISTRY

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    start_http_server(args.metrics_port, registry=REGISTRY)
    kopf.run(
        standalone=True,  # one replica with a Recreate strategy; no peering objects needed
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{args.probe_port}/healthz",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
