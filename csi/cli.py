"""The `strata` command.

  serve   run the CSI plugin (node service, optional controller, metrics)
  pull    pull an image into the node's store, with progress (like `docker pull`)
  gc      collect unreferenced layers now, by policy (safe while the server runs)
  ls      images and layers in the store, with sizes and references
  df      disk use and what layer sharing saves, like `docker system df`
  diff    what a publication changed (A added, C changed, D deleted), like `docker diff`
  demo    build a demo image, publish it to two pods, show copy-on-write, clean up

Every setting is a flag and a STRATA_* environment variable, generated from csi/config.py.
"""

import argparse
import dataclasses
import os

from csi import logs
from csi.config import Config, env_name, flag, parse_switch, repeatable, settings, switch
from csi.errors import StrataError
from csi.pulls import POLICIES

COMMANDS = {
    "serve": "run the CSI plugin",
    "pull": "pull an image into the store, with progress",
    "gc": "collect unreferenced layers now",
    "ls": "list images and layers",
    "df": "show disk use and sharing",
    "diff": "what a publication changed, like `docker diff`",
    "demo": "build a demo image, publish it to two pods, show copy-on-write, clean up "
            "(no cluster, no network)",
}


def _add_settings(p: argparse.ArgumentParser, command: str) -> None:
    for f in settings(command):
        env = env_name(f)
        raw = os.environ.get(env)
        text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if repeatable(f):
            p.add_argument(flag(f), dest=f.name, action="append", default=None,
                           metavar=flag(f).lstrip("-").replace("-", "_").upper(),
                           help=f"{text}; repeatable (env {env}, "
                                "comma-separated)")
            p.set_defaults(**{f.name + "_env": [x for x in (raw or "").split(",") if x]})
            continue
        if switch(f):  # given: on; else the environment's value (parsed in _config)
            p.add_argument(flag(f), dest=f.name, action="store_true", default=None,
                           help=f"{text} (env {env}=true)")
            p.set_defaults(**{f.name + "_env": raw})
            continue
        # The environment's value is converted in _config, so a bad one is refused naming
        # the variable (argparse would name only the flag).
        p.add_argument(flag(f), dest=f.name, default=None, type=_type(f),
                       choices=f.metadata["choices"] or None,
                       help=f"{text} (env {env}; default {f.default!r})")
        p.set_defaults(**{f.name + "_env": raw})


def _type(f: dataclasses.Field):
    """What turns a flag's (or variable's) text into the setting's value: upper-case
    choices (log levels) are taken in any case."""
    choices = f.metadata["choices"]
    return str.upper if choices and all(c.isupper() for c in choices) else f.type


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, help_ in COMMANDS.items():
        p = sub.add_parser(command, help=help_, description=help_)
        p.set_defaults(command_parser=p)  # errors in its values show its own usage
        _add_settings(p, command)
        if command == "pull":
            p.add_argument("image", help="e.g. nginx:1.27 or registry:5000/team/app@sha256:…")
            p.add_argument("--pull-policy", default="Always", choices=POLICIES,
                           help="as for containers; default 'Always' (`docker pull` asks the "
                                "registry)")
        elif command == "diff":
            p.add_argument("target", metavar="TARGET|VOLUME_ID",
                           help="a publication's target path, or the ID of a volume "
                                "published once")
            p.add_argument("--json", action="store_true",
                           help="a JSON array, one object per change: Path, Kind (0 "
                                "changed, 1 added, 2 deleted, as Docker's API), Change "
                                "(C, A or D)")
        elif command == "demo":
            p.add_argument("--keep", action="store_true", help="keep the temporary root")
    return parser


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    values = {}
    try:
        for f in settings(args.command):
            value = getattr(args, f.name)
            if repeatable(f):
                value = tuple(value if value is not None else getattr(args, f.name + "_env"))
            elif value is None:
                raw = getattr(args, f.name + "_env")
                value = f.default if raw is None else _from_env(f, raw)
            values[f.name] = value
        return dataclasses.replace(Config(), **values).validate(args.command)
    except (StrataError, ValueError) as e:
        getattr(args, "command_parser", parser).error(str(e))


def _from_env(f: dataclasses.Field, raw: str):
    if switch(f):
        return parse_switch(raw, env_name(f))
    try:
        value = _type(f)(raw)
    except ValueError:
        raise ValueError(f"{env_name(f)} (for {flag(f)}): invalid {f.type.__name__} value: "
                         f"{raw!r}") from None
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise ValueError(f"{env_name(f)} (for {flag(f)}) must be one of {', '.join(choices)}, "
                         f"got {raw!r}")
    return value


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Arguments parsed; an unknown one is refused by the command's own parser, so the
    message shows that command's usage (`strata serve: error: …`), not the top level's."""
    args, rest = parser.parse_known_args(argv)
    if rest:
        getattr(args, "command_parser", parser).error(
            f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = _parse(parser, argv)
    if args.command == "demo":
        from csi import demo

        return demo.run(keep=args.keep)
    config = _config(args, parser)
    logs.configure(config.log_level, config.log_format)
    if args.command == "serve":
        from csi.server import serve

        return serve(config)
    from csi import store_cli

    if args.command == "pull":
        return store_cli.run(store_cli.pull, config, args.image, args.pull_policy)
    if args.command == "diff":
        return store_cli.run(store_cli.diff, config, args.target, args.json)
    return store_cli.run(getattr(store_cli, args.command), config)


if __name__ == "__main__":
    raise SystemExit(main())
