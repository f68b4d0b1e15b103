"""`benchsync config`: check, show and document the node's settings.

`check` and `show` load the configuration exactly as `benchsync up` would
(defaults < file < environment), so a mistake is found before the node is
started; `docs` and `example` print what `daemon/config.py`'s table generates.
"""

from __future__ import annotations

import argparse
import json

from benchsync.daemon.cli.common import CLIError, data_dir
from benchsync.daemon.config import (
    SETTINGS,
    Config,
    ConfigError,
    load_config,
    render_example_toml,
    render_markdown,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="check, show and document the node's settings")
    actions = p.add_subparsers(dest="config_action", metavar="ACTION")
    actions.required = True
    for name, help_text in (
        ("check", "load the config as `benchsync up` would and report the first problem"),
        ("show", "print the effective settings and where each came from"),
    ):
        a = actions.add_parser(name, help=help_text)
        a.add_argument("--home", help="data directory (default: $BENCHSYNC_HOME, else XDG)")
        a.add_argument("--config", metavar="FILE", help="config file (default: <home>/config.toml)")
        if name == "show":
            a.add_argument("--json", action="store_true", help="one JSON document on stdout")
        a.set_defaults(func=run)
    actions.add_parser("docs", help="print docs/config.md (generated)").set_defaults(func=run)
    actions.add_parser("example", help="print an example config.toml").set_defaults(func=run)


def load(args: argparse.Namespace) -> Config:
    """The configuration `args` name, or CLIError saying what is wrong."""
    try:
        return load_config(data_dir(args.home), args.config)
    except ConfigError as e:
        raise CLIError(e.message, e.hint) from None


def run(args: argparse.Namespace) -> int:
    action = args.config_action
    if action == "docs":
        print(render_markdown(), end="")
    elif action == "example":
        print(render_example_toml(), end="")
    elif action == "check":
        config = load(args)
        print(f"OK: configuration of {config.home} is valid")
    else:
        config = load(args)
        values = config.to_dict()
        if args.json:
            print(json.dumps({"settings": values, "sources": dict(config.sources)}, indent=2))
        else:
            print(f"home = {values['home']}")
            for s in SETTINGS:
                print(f"{s.name} = {json.dumps(values[s.name])}  # {config.sources[s.name]}")
    return 0
