"""The `strata` command.

  serve   run the CSI plugin (node service, optional controller, metrics)
  pull    pull an image into the node's store, with progress (like `docker pull`)
  gc      collect unreferenced layers now, by policy (safe while the server runs)
  ls      images and layers in the store, with sizes and references
  df      disk use and what layer sharing saves, like `docker system df`
  diff    what a publication changed (A added, C changed, D deleted), like `docker diff`
  demo    build a demo image, publish it to two pods, show copy-on-write, clean up

Every setting is a flag, a STRATA_* environment variable and a key of the config file
(--config, STRATA_CONFIG, else /etc/strata/config.yaml if it exists), generated from
csi/config.py; a flag wins over the environment, which wins over the file.
Exit status: 0 done, 1 failed (the reason on stderr), 2 a usage error.
"""

import argparse
import dataclasses
import logging
import os
import re

from csi import __version__, logs
from csi.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_FILE,
    Config,
    env_name,
    file_key,
    flag,
    parse_switch,
    read_file,
    repeatable,
    settings,
    switch,
    value_type,
)
from csi.errors import InvalidArgument, StrataError
from csi.image import reference
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
    # Each setting's environment variable is read here and converted in _config, so that a
    # bad one is refused naming the variable (argparse would name only the flag).
    for f in settings(command):
        env = env_name(f)
        p.set_defaults(**{f.name + "_env": os.environ.get(env)})
        text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if repeatable(f):
            p.add_argument(flag(f), dest=f.name, action="append", default=None,
                           metavar=flag(f).lstrip("-").replace("-", "_").upper(),
                           help=f"{text}; repeatable (env {env}, comma-separated)")
        elif switch(f):
            p.add_argument(flag(f), dest=f.name, action="store_true", default=None,
                           help=f"{text} (env {env}=true)")
        else:
            p.add_argument(flag(f), dest=f.name, default=None, type=value_type(f),
                           choices=f.metadata["choices"] or None,
                           help=f"{text} (env {env}; default {f.default!r})")
    if command != "demo":  # the demo is self-contained: it reads no settings
        p.add_argument("--config", metavar="PATH", default=None,
                       help=f"a YAML file of settings, keyed by the flags without dashes "
                            f"(`registry-timeout: 5`, `insecure-registry: [HOST:PORT]`); "
                            f"flags and the environment win over it (env {CONFIG_ENV}; "
                            f"default {DEFAULT_CONFIG_FILE}, read if it exists; '' for "
                            "none)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"strata {__version__}")
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
    """The command's settings: each from its flag, else its environment variable, else the
    config file, else its default. A refusal names the flag, and where a value that is not
    the flag's came from."""
    values, origins = {}, {}
    try:
        path, origin = _config_file(args)
        try:
            in_file = read_file(path, required=origin != "default") if path else {}
        except InvalidArgument as e:
            if origin == CONFIG_ENV and not os.path.exists(path):
                raise InvalidArgument(f"{e} (from {CONFIG_ENV})") from None
            raise
        for f in settings(args.command):
            value, raw = getattr(args, f.name), getattr(args, f.name + "_env")
            if value is not None:
                value = tuple(value) if repeatable(f) else value
            elif raw is not None:
                value, origins[flag(f)] = _from_env(f, raw), ("", env_name(f))
            elif f.name in in_file:
                value = in_file[f.name]
                origins[flag(f)] = (f"config file {path}", file_key(f))
            else:
                value = f.default
            values[f.name] = value
        return dataclasses.replace(Config(), **values).validate(args.command)
    except (StrataError, ValueError) as e:
        getattr(args, "command_parser", parser).error(_sourced(str(e), origins))


def _config_file(args: argparse.Namespace) -> tuple[str, str]:
    """The config file to read ("" for none) and who named it: --config, STRATA_CONFIG,
    or "default" (read only if it exists)."""
    if args.config is not None:
        return args.config, "--config"
    if CONFIG_ENV in os.environ:
        return os.environ[CONFIG_ENV], CONFIG_ENV
    return DEFAULT_CONFIG_FILE, "default"


def _sourced(message: str, origins: dict[str, tuple[str, str]]) -> str:
    """`message`, and where the value of each flag it names came from when that was not
    the flag itself: `origins` maps a flag to ("", VARIABLE) or ("config file PATH", KEY)."""
    named = [(file, name) for option, (file, name) in origins.items()
             if re.search(rf"{re.escape(option)}(?![\w-])", message)
             and (file or name not in message)]  # a variable's own message names it
    parts = []
    for file in dict.fromkeys(file for file, _ in named):
        names = [name for f, name in named if f == file]
        parts.append(", ".join(names) if not file else
                     f"{file}, {'key' if len(names) == 1 else 'keys'} {', '.join(names)}")
    return f"{message} (from {'; '.join(parts)})" if parts else message


def _from_env(f: dataclasses.Field, raw: str):
    if repeatable(f):
        return tuple(x for x in raw.split(",") if x)
    if switch(f):
        return parse_switch(raw, env_name(f))
    try:
        value = value_type(f)(raw)
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

        # Its server and tools run from a temporary root with their own flags: a node's
        # config file must not reach them.
        os.environ[CONFIG_ENV] = ""
        return demo.run(keep=args.keep)
    config = _config(args, parser)
    if args.command == "pull":
        _check_reference(args)
    if args.command == "serve":
        from csi.server import serve

        logs.configure(config.log_level, config.log_format)
        return serve(config)
    # A tool's output is its answer: its log lines are only for what goes wrong.
    logs.configure("WARNING", config.log_format).setLevel(logging.WARNING)
    from csi import store_cli

    if args.command == "pull":
        return store_cli.run(store_cli.pull, config, args.image, args.pull_policy)
    if args.command == "diff":
        return store_cli.run(store_cli.diff, config, args.target, args.json)
    return store_cli.run(getattr(store_cli, args.command), config)


def _check_reference(args: argparse.Namespace) -> None:
    """`strata pull`'s image argument, refused in the CLI's words (a usage error), not a
    volume attribute's."""
    image = args.image
    try:
        reference.parse(image)
    except InvalidArgument as e:
        reason = "it is empty (e.g. nginx:1.27)" if not image else str(e)
        for prefix in (f"image reference {image[:80]!r} is malformed: ", f"image {image!r}: ",
                       "invalid reference format: "):
            reason = reason.removeprefix(prefix)
        reason = reason.removesuffix(f": {image!r}")
        args.command_parser.error(f"invalid image reference {image!r}: {reason}")


if __name__ == "__main__":
    raise SystemExit(main())
