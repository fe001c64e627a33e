"""The `strata` command.

  serve   run the CSI plugin (node service, optional controller, metrics)
  pull    pull an image into the node's store, with progress (like `docker pull`)
  gc      collect unreferenced layers now, by policy (safe while the server runs)
  ls      images and layers in the store, with sizes and references
  df      disk use and what layer sharing saves, like `docker system df`
  diff    what a publication changed (A added, C changed, D deleted), like `docker diff`
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


def _list_opt(p, flag: str, help_: str) -> None:
    env = flag.lstrip("-").replace("-", "_")
    default = [x for x in env_default(env).split(",") if x]
    p.add_argument(flag, action="append", default=None,
                   help=f"{help_}; repeatable (env STRATA_{env.upper()}, comma-separated)")
    p.set_defaults(**{env + "_env": default})


def _registry_opts(p) -> None:
    _opt(p, "--registry-config", D.registry_config, "docker config.json with node-wide "
         "registry credentials")
    _list_opt(p, "--registry-ca", "a PEM file of CAs to trust for registries, beside the "
              "system's")
    _list_opt(p, "--insecure-registry", "HOST:PORT to reach over plain HTTP (e.g. kind's "
              "local registry)")
    _list_opt(p, "--registry-mirror", "REGISTRY=URL: try this mirror first, e.g. "
              "docker.io=https://mirror.example")
    _opt(p, "--registry-timeout", D.registry_timeout, "seconds to connect to a registry")
    _opt(p, "--registry-read-timeout", D.registry_read_timeout, "seconds a registry may be "
         "silent mid-request")
    _opt(p, "--registry-retries", D.registry_retries, "retries on 429, 5xx and dropped "
         "connections (exponential backoff with jitter)")
    _opt(p, "--tag-ttl", D.tag_ttl, "seconds a tag's resolution is trusted (IfNotPresent)")


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
    _registry_opts(serve)
    _list_opt(serve, "--oci-layout-root", "allow oci:/PATH images only below this directory "
              "(default: anywhere)")
    _opt(serve, "--pull-wait", D.pull_wait, "seconds NodePublish waits for a pull before "
         "answering ABORTED (the pull goes on; the kubelet's retry joins it)")
    pull = sub.add_parser("pull", help="pull an image into the store, with progress")
    pull.add_argument("image", help="e.g. nginx:1.27 or registry:5000/team/app@sha256:…")
    pull.add_argument("--pull-policy", default="Always",
                      choices=("IfNotPresent", "Always", "Never"))
    _root_opt(pull)
    _registry_opts(pull)
    gc = sub.add_parser("gc", help="collect unreferenced layers now")
    _root_opt(gc)
    _gc_opts(gc)
    for name, help_ in (("ls", "list images and layers"), ("df", "show disk use and sharing")):
        _root_opt(sub.add_parser(name, help=help_))
    diff = sub.add_parser("diff", help="what a publication changed, like `docker diff`")
    diff.add_argument("target", help="the publication's target path")
    _root_opt(diff)
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
            registry_config=getattr(args, "registry_config", ""),
            registry_ca=_listed(args, "registry_ca"),
            insecure_registries=_listed(args, "insecure_registry"),
            registry_mirrors=_listed(args, "registry_mirror"),
            registry_timeout=float(getattr(args, "registry_timeout", D.registry_timeout)),
            registry_read_timeout=float(getattr(args, "registry_read_timeout",
                                                D.registry_read_timeout)),
            registry_retries=int(getattr(args, "registry_retries", D.registry_retries)),
            tag_ttl=float(getattr(args, "tag_ttl", D.tag_ttl)),
            pull_wait=float(getattr(args, "pull_wait", D.pull_wait)),
            oci_layout_roots=_listed(args, "oci_layout_root"),
        ).validate()
    except (StrataError, ValueError) as e:
        parser.error(str(e))


def _listed(args, name: str) -> tuple[str, ...]:
    given = getattr(args, name, None)
    return tuple(given if given is not None else getattr(args, name + "_env", []))


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
    if args.command == "pull":
        from csi import store_cli

        return store_cli.pull(config, args.image, args.pull_policy)
    if not os.path.exists(os.path.join(config.root, "state.db")):
        print(f"strata: no store at {config.root}", file=sys.stderr)
        return 1
    from csi import store_cli

    if args.command == "diff":
        return store_cli.diff(config, args.target)
    return {"gc": store_cli.gc, "ls": store_cli.ls, "df": store_cli.df}[args.command](config)


if __name__ == "__main__":
    raise SystemExit(main())
