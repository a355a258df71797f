"""`piggyback` command line: serve a runtime, run the demo, profile the device, simulate."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import threading
from typing import TYPE_CHECKING, Any

from piggyback_runtime.config import ConfigError, RuntimeConfig
from piggyback_runtime.scheduler.policies import registry

if TYPE_CHECKING:
    from piggyback_runtime.server.app import Runtime

log = logging.getLogger("piggyback_runtime.serve")

# After the drain, what uvicorn and the engine get to close down; the process is gone within
# drain_timeout_s + EXIT_MARGIN_S (below the operator's grace period of drain + 15 s) whatever happens.
SHUTDOWN_TIMEOUT_S = 1.0
# What the router image (Dockerfile, target router) does not install; the commands needing them are absent there.
TORCH_FREE_IMAGE_LACKS = ("torch", "numpy")
EXIT_MARGIN_S = 4.5


def _draining_server(runtime: Runtime, config: Any, drain_timeout_s: float) -> Any:
    """A uvicorn server whose SIGTERM drains the runtime (`Runtime.drain`) before it stops serving.

    Uvicorn's own SIGTERM closes the listening socket at once (new requests would be refused, not answered
    503) and waits for open requests without a bound. Here SIGTERM starts the drain on the event loop; the
    server keeps answering (503 for new work) until the drain ends, then shuts down. A second SIGTERM or a
    SIGINT falls back to uvicorn's handling.
    """
    import asyncio
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self._loop: asyncio.AbstractEventLoop | None = None
            self._drain_started = False

        async def startup(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if sig != signal.SIGTERM or self._drain_started or self._loop is None:
                super().handle_exit(sig, frame)
                return
            # Not recorded in uvicorn's captured signals: it would re-raise SIGTERM at exit (exit code -15).
            self._drain_started = True
            runtime.begin_drain()  # readiness fails from this instant
            _exit_watchdog(drain_timeout_s + EXIT_MARGIN_S)
            self._loop.call_soon_threadsafe(self._start_drain)

        def _start_drain(self) -> None:
            async def drain_then_exit() -> None:
                try:
                    await runtime.drain(drain_timeout_s)
                finally:
                    self.should_exit = True

            self._drain_task = asyncio.ensure_future(drain_then_exit())

    return DrainingServer()


def _exit_watchdog(after_s: float) -> None:
    """Last resort: if shutting down hangs, leave anyway so the pod's grace period never runs out first."""

    def expire() -> None:
        log.error("shutdown did not finish within %.1f s of SIGTERM; exiting now", after_s)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(after_s, expire)
    timer.daemon = True
    timer.start()


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from piggyback_runtime.server.app import Runtime, create_app

    config = RuntimeConfig.from_yaml(args.config)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        config = config.model_copy(update={"server": config.server.model_copy(update=overrides)})
    if args.tensor_parallel_size is not None:
        config = RuntimeConfig.from_dict(
            {**config.model_dump(by_alias=True),
             "engine": {**config.engine.model_dump(), "tensor_parallel_size": args.tensor_parallel_size}},
            source="--tensor-parallel-size",
        )  # fmt: skip
    sys.setswitchinterval(config.server.gil_switch_interval_s)  # the whole process: see ServerConfig
    runtime = Runtime(config)
    runtime.load_in_background()
    extensions = []
    if config.batch.enabled:  # the Batch API (/v1/files, /v1/batches) and its runner
        from piggyback_runtime.batch import batch_extension

        extensions.append(batch_extension)
    server_config = uvicorn.Config(
        create_app(runtime, extensions),
        host=config.server.host,
        port=config.server.port,
        log_level=args.log_level.lower(),
        access_log=False,
        # Connections still open once the drain is over get this long before uvicorn cancels them.
        timeout_graceful_shutdown=int(SHUTDOWN_TIMEOUT_S),
    )
    _draining_server(runtime, server_config, config.server.drain_timeout_s).run()
    runtime.shutdown(SHUTDOWN_TIMEOUT_S)  # the engine loop and the CPU workers, bounded
    return 0


def _router(args: argparse.Namespace) -> int:
    import os

    from piggyback_runtime.router import INTERNAL_TOKEN_ENV
    from piggyback_runtime.router.app import run_router, settings_from
    from piggyback_runtime.router.leader import ElectionSettings, make_leadership

    try:
        settings = settings_from(args.pool_endpoints, args.policy, args.stage_boundaries, args.poll_interval_s,
                                 os.environ.get(INTERNAL_TOKEN_ENV, ""), args.pool_dns,
                                 refine_interval_s=args.refine_interval_s, replan_interval_s=args.replan_interval_s,
                                 replan_min_requests=args.replan_min_requests)  # fmt: skip
        timing = {"lease_duration_s": args.lease_duration_s, "renew_deadline_s": args.lease_renew_deadline_s,
                  "retry_s": args.lease_retry_s}  # fmt: skip
        election = ElectionSettings(args.leader_lease or "", args.leader_namespace or "", args.kube_api or "",
                                    **{k: v for k, v in timing.items() if v is not None})
        leadership, how = make_leadership(election, settings.pool_dns)
    except ValueError as exc:
        print(f"piggyback router: {exc}", file=sys.stderr)
        return 2
    log.info("router: %s", how)
    run_router(settings, args.host, args.port, leadership)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from piggyback_runtime.demo import run_demo

    return run_demo(
        duration_s=args.duration_s, ls_rate_per_s=args.ls_rate, be_concurrency=args.be_concurrency, model_uri=args.model
    )


def _profile(args: argparse.Namespace) -> int:
    from piggyback_runtime.profiler import profile_main

    return profile_main(args.profile_args)


def _policies_help() -> str:
    """The values of `engine.policy`, from the registry (scheduler/policies/: a new module shows up here)."""
    lines = ["engine.policy (in the config) is one of:"]
    for name, cls in registry().items():
        lines += textwrap.wrap(cls.summary(), 110, initial_indent=f"  {name:<10} ", subsequent_indent=" " * 13)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="piggyback", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a runtime from a RuntimeConfig YAML file", epilog=_policies_help(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    serve.add_argument("--config", required=True, help="path to the RuntimeConfig YAML")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--tensor-parallel-size", type=int, metavar="N",
                       help="override engine.tensor_parallel_size: this process is rank 0 and starts ranks 1..N-1 "
                            "(one GPU each, cuda:RANK; or CPU processes with gloo)")  # fmt: skip
    serve.set_defaults(func=_serve)
    router = sub.add_parser("router", help="route one pool's requests over its replicas (router/app.py)")
    router.add_argument("--pool-endpoints", help="comma-separated replica base URLs")
    router.add_argument("--pool-dns", help="host:port of a headless Service whose addresses are the replicas")
    router.add_argument("--policy", default="roundRobin", help="roundRobin | leastLoaded | lengthAware")
    router.add_argument("--stage-boundaries", help="lengthAware: stage upper bounds in tokens, e.g. 2048,16384")
    router.add_argument("--poll-interval-s", type=float, default=0.2, help="how often replicas' loads are read")
    router.add_argument("--refine-interval-s", type=float,
                        help="lengthAware: seconds between boundary refinements (0: never)")  # fmt: skip
    router.add_argument("--replan-interval-s", type=float,
                        help="lengthAware: least seconds between DP re-plans (0: never)")  # fmt: skip
    router.add_argument("--replan-min-requests", type=int,
                        help="lengthAware: finished requests observed before the first DP re-plan")  # fmt: skip
    router.add_argument("--host", default="0.0.0.0", help="listen address")
    router.add_argument("--port", type=int, default=8000, help="listen port")
    # Leader election among a pool's routers (router/leader.py); standalone without Kubernetes.
    router.add_argument("--leader-lease", help="Lease name (default: <pool>-router from --pool-dns)")
    router.add_argument("--leader-namespace", help="Lease namespace (default: from --pool-dns, else the pod's)")
    router.add_argument("--kube-api", help="API server URL (default: in-cluster, with the pod's service account)")
    router.add_argument("--lease-duration-s", type=float, help="a Lease not renewed this long is free (15)")
    router.add_argument("--lease-renew-deadline-s", type=float,
                        help="a leader that cannot renew this long steps down; < lease duration (10)")  # fmt: skip
    router.add_argument("--lease-retry-s", type=float, help="seconds between election rounds (2)")
    router.set_defaults(func=_router)
    demo = sub.add_parser("demo", help="serve an LS and a BE service of a synthetic model under mixed load")
    demo.add_argument("--duration-s", type=float, default=60.0, help="how long to drive load")
    demo.add_argument("--ls-rate", type=float, default=2.0, help="LS Poisson arrival rate, requests/s")
    demo.add_argument("--be-concurrency", type=int, default=8, help="BE requests kept in flight")
    demo.add_argument("--model", default="synthetic://small-llama", help="model URI")
    demo.set_defaults(func=_demo)
    profile = sub.add_parser("profile", add_help=False,
                             help="profile the latency model on this device and cache it (profile --help)")
    profile.set_defaults(func=_profile)
    try:
        from piggyback_runtime.sim.cli import add_parser as add_sim_parser
    except ModuleNotFoundError as exc:  # the router image has no torch or numpy: no `piggyback sim` there
        if exc.name not in TORCH_FREE_IMAGE_LACKS:
            raise
    else:
        add_sim_parser(sub)
    # `profile` has its own options (profile_main parses them); every other command takes only its own.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "profile":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.profile_args = extra
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
