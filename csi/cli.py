"""The `strata` command.

  serve   run the CSI plugin (node service, optional controller, metrics)
  gc      collect unreferenced layers now, by policy (safe while the server runs)
  ls      images and layers in the store, with sizes and references
  df      disk use and what layer sharing saves, like `docker system df`
  demo    build a demo image, publish it to two pods, show copy-on-write, clean up
"""

import argparse
import logging
import os
import sys

from csi.config import Config, env_default
from csi.errors import StrataError

D = Config()


def _opt(p, flag: str, default, help_: str) -> None:
    env = flag.lstrip("-").replace("-", "_")
    p.add_argument(flag, default=env_default(env, str(default)),
                   help=f"{help_} (env STRATA_{env.upper()}; default {default!r})")


def _root_opt(p) -> None:
    _opt(p, "--root", D.root, "store root: state.db, layers/, volumes/, tmp/")


def _gc_opts(p) -> None:
    _opt(p, "--gc-policy", D.gc_policy, "immediate: drop unreferenced layers at once; lru: "
         "keep them as a cache until the high-water mark")
    _opt(p, "--gc-high-percent", D.gc_high_percent, "lru: start collecting above this % of "
         "capacity")
    _opt(p, "--gc-low-percent", D.gc_low_percent, "lru: collect down to this %")
    _opt(p, "--gc-max-bytes", D.gc_max_bytes, "capacity for the marks; 0 = the filesystem "
         "under --root")
    _opt(p, "--gc-min-age", D.gc_min_age, "seconds a layer stays after its last use")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the CSI plugin")
    _opt(serve, "--endpoint", D.endpoint, "CSI node endpoint, unix:///PATH")
    _root_opt(serve)
    _opt(serve, "--node-id", D.node_id, "this node's ID (Kubernetes: the node name)")
    _opt(serve, "--controller-endpoint", D.controller_endpoint,
         "also serve the controller on this unix:///PATH")
    _opt(serve, "--metrics-address", D.metrics_address, "serve Prometheus metrics on HOST:PORT")
    _opt(serve, "--log-level", D.log_level, "DEBUG, INFO, WARNING or ERROR")
    _opt(serve, "--grace-seconds", D.grace_seconds,
         "how long running RPCs may take to finish on SIGTERM")
    _gc_opts(serve)
    gc = sub.add_parser("gc", help="collect unreferenced layers now")
    _root_opt(gc)
    _gc_opts(gc)
    for name, help_ in (("ls", "list images and layers"), ("df", "show disk use and sharing")):
        _root_opt(sub.add_parser(name, help=help_))
    demo = sub.add_parser("demo", help="build a demo image, publish it to two pods, show "
                          "copy-on-write, clean up (no cluster, no network)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary root")
    return parser


def _config(args, parser) -> Config:
    try:
        return Config(
            endpoint=getattr(args, "endpoint", D.endpoint), root=args.root,
            node_id=getattr(args, "node_id", "") or "cli",
            controller_endpoint=getattr(args, "controller_endpoint", ""),
            metrics_address=getattr(args, "metrics_address", ""),
            log_level=getattr(args, "log_level", "INFO").upper(),
            grace_seconds=float(getattr(args, "grace_seconds", D.grace_seconds)),
            gc_policy=getattr(args, "gc_policy", D.gc_policy),
            gc_high_percent=float(getattr(args, "gc_high_percent", D.gc_high_percent)),
            gc_low_percent=float(getattr(args, "gc_low_percent", D.gc_low_percent)),
            gc_max_bytes=int(getattr(args, "gc_max_bytes", D.gc_max_bytes)),
            gc_min_age=float(getattr(args, "gc_min_age", D.gc_min_age)),
        ).validate()
    except (StrataError, ValueError) as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from csi import demo

        return demo.run(keep=args.keep)
    if args.command == "serve" and not args.node_id:
        parser.error("--node-id (or STRATA_NODE_ID) is required")
    config = _config(args, parser)
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        from csi.server import serve

        return serve(config)
    if not os.path.exists(os.path.join(config.root, "state.db")):
        print(f"strata: no store at {config.root}", file=sys.stderr)
        return 1
    from csi import store_cli

    return {"gc": store_cli.gc, "ls": store_cli.ls, "df": store_cli.df}[args.command](config)


if __name__ == "__main__":
    raise SystemExit(main())
