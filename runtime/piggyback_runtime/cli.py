"""`piggyback` command line: serve a runtime, run the demo, profile the device, simulate."""

from __future__ import annotations

import argparse
import logging
import sys

from piggyback_runtime.config import ConfigError, RuntimeConfig


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from piggyback_runtime.server.app import Runtime, create_app

    config = RuntimeConfig.from_yaml(args.config)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        config = config.model_copy(update={"server": config.server.model_copy(update=overrides)})
    runtime = Runtime(config)
    runtime.load_in_background()
    uvicorn.run(
        create_app(runtime),
        host=config.server.host,
        port=config.server.port,
        log_level=args.log_level.lower(),
        access_log=False,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from piggyback_runtime.demo import run_demo

    return run_demo(
        duration_s=args.duration_s, ls_rate_per_s=args.ls_rate, be_concurrency=args.be_concurrency, model_uri=args.model
    )


def _profile(args: argparse.Namespace) -> int:
    from piggyback_runtime.profiler import profile_main

    return profile_main(args.profile_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="piggyback", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a runtime from a RuntimeConfig YAML file")
    serve.add_argument("--config", required=True, help="path to the RuntimeConfig YAML")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.set_defaults(func=_serve)
    demo = sub.add_parser("demo", help="serve an LS and a BE service of a synthetic model under mixed load")
    demo.add_argument("--duration-s", type=float, default=60.0, help="how long to drive load")
    demo.add_argument("--ls-rate", type=float, default=2.0, help="LS Poisson arrival rate, requests/s")
    demo.add_argument("--be-concurrency", type=int, default=8, help="BE requests kept in flight")
    demo.add_argument("--model", default="synthetic://small-llama", help="model URI")
    demo.set_defaults(func=_demo)
    profile = sub.add_parser("profile", add_help=False,
                             help="profile the latency model on this device and cache it (profile --help)")
    profile.set_defaults(func=_profile)
    from piggyback_runtime.sim.cli import add_parser as add_sim_parser

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
