"""The `strata` command: `serve` runs the plugin; `demo` shows it working end to end."""

import argparse
import logging
import sys

from csi.config import Config, env_default
from csi.errors import StrataError


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the CSI plugin (node service, optional controller)")
    d = Config()

    def opt(flag: str, default: str, help_: str, env: str) -> None:
        p.add_argument(flag, default=env_default(env, default),
                       help=f"{help_} (env STRATA_{env.upper()}; default {default!r})")

    opt("--endpoint", d.endpoint, "CSI node endpoint, unix:///PATH", "endpoint")
    opt("--root", d.root, "store root: state.db, layers/, volumes/, tmp/", "root")
    opt("--node-id", d.node_id, "this node's ID (Kubernetes: the node name)", "node_id")
    opt("--controller-endpoint", d.controller_endpoint,
        "also serve the controller on this unix:///PATH", "controller_endpoint")
    opt("--metrics-address", d.metrics_address, "serve Prometheus metrics on HOST:PORT",
        "metrics_address")
    opt("--log-level", d.log_level, "DEBUG, INFO, WARNING or ERROR", "log_level")
    opt("--grace-seconds", str(d.grace_seconds),
        "how long running RPCs may take to finish on SIGTERM", "grace_seconds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strata", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    demo = sub.add_parser("demo", help="build a demo image, publish it to two pods, show "
                          "copy-on-write, clean up (no cluster, no network)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary root")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from csi import demo as demo_mod

        return demo_mod.run(keep=args.keep)

    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = Config(
            endpoint=args.endpoint, root=args.root, node_id=args.node_id,
            controller_endpoint=args.controller_endpoint,
            metrics_address=args.metrics_address, log_level=args.log_level.upper(),
            grace_seconds=float(args.grace_seconds),
        ).validate()
    except (StrataError, ValueError) as e:
        parser.error(str(e))
    from csi.server import serve

    return serve(config)


if __name__ == "__main__":
    raise SystemExit(main())
