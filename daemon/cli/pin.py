"""`benchsync pin add|rm|ls` and `benchsync tag`: versions kept forever.

History retention thins old versions (their tables go; `log` marks them);
a pinned or tagged version keeps its tables whatever its age. Any complete
DAG held here can be pinned too, such as a file or directory `benchsync get`
fetched: its blocks then survive `gc` (unpinned, the node keeps them only an
hour after the get). A tag also
names the version for `restore NAME` and `export NAME`. Through the running
node when there is one (it collects blocks); offline otherwise.
"""

from __future__ import annotations

import argparse
import json
import time

from benchsync.daemon.cli.common import (
    CLIError,
    add_node_arguments,
    call_node,
    node_client,
    open_dataset,
)
from benchsync.storage.errors import StorageError

KEEP_HINT = "`benchsync log` lists versions; thinned ones cannot be kept any more"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pin", help="keep versions (or any complete DAG) forever")
    pin_sub = p.add_subparsers(dest="pin_command", metavar="add|rm|ls")
    pin_sub.required = True
    for name, helptext in (
        ("add", "keep CID forever (a version, its prefix or a tag, or any complete DAG such "
                "as one `benchsync get` fetched)"),
        ("rm", "stop keeping CID forever (retention decides again)"),
    ):
        q = pin_sub.add_parser(name, help=helptext)
        add_node_arguments(q)
        q.add_argument("cid")
        q.add_argument("--json", action="store_true", help="print one JSON document")
        q.set_defaults(func=run_pin)
    q = pin_sub.add_parser("ls", help="list pinned roots")
    add_node_arguments(q)
    q.add_argument("--json", action="store_true", help="print one JSON document")
    q.set_defaults(func=run_pin)

    p = sub.add_parser(
        "tag", help="name a version (default: the head); tagged versions are kept forever"
    )
    add_node_arguments(p)
    p.add_argument("name", nargs="?", help="the tag (without it: list tags)")
    p.add_argument("cid", nargs="?", help="the version (default: the head)")
    p.add_argument("-d", "--delete", action="store_true", help="remove the tag NAME")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run_tag)


def run_pin(args: argparse.Namespace) -> int:
    client = node_client(args)
    command = args.pin_command
    if command == "ls":
        if client is not None:
            pins = {p["cid"]: p["pinned_at"] for p in call_node(client, "GET", "/v1/pins")["pins"]}
        else:
            with open_dataset(args) as ds:
                pins = ds.pins()
        if args.json:
            print(json.dumps([{"cid": c, "pinned_at": t} for c, t in sorted(pins.items())]))
        for cid, when in sorted(pins.items(), key=lambda kv: kv[1]) if not args.json else ():
            print(f"{cid}  pinned {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}")
        return 0
    action = "add" if command == "add" else "rm"
    if client is not None:
        doc = call_node(client, "POST", "/v1/pins", {"cid": args.cid, "action": action})
    else:
        with open_dataset(args) as ds:
            try:
                if action == "add":
                    doc = {"pinned": ds.pin_version(args.cid)}
                else:
                    doc = {"unpinned": ds.unpin(args.cid)}
            except StorageError as e:  # NotFound, a thinned or incomplete DAG
                raise CLIError(str(e), KEEP_HINT) from e
    if args.json:
        print(json.dumps(doc))
    elif action == "add":
        print(doc["pinned"])
    elif not doc["unpinned"]:
        raise CLIError(f"{args.cid} is not pinned", "`benchsync pin ls` lists the pins")
    return 0


def run_tag(args: argparse.Namespace) -> int:
    client = node_client(args)
    if args.name is None:
        if args.delete or args.cid:
            raise CLIError("give the tag's NAME", "benchsync tag NAME [CID]; benchsync tag -d NAME")
        if client is not None:
            tags = call_node(client, "GET", "/v1/tags")["tags"]
        else:
            with open_dataset(args) as ds:
                tags = ds.tags()
        if args.json:
            print(json.dumps(tags))
        for name, cid in sorted(tags.items()) if not args.json else ():
            print(f"{name}  {cid}")
        return 0
    if client is not None:
        body = {"name": args.name, "remove": True} if args.delete else {"name": args.name}
        if args.cid and not args.delete:
            body["cid"] = args.cid
        doc = call_node(client, "POST", "/v1/tags", body)
    else:
        with open_dataset(args) as ds:
            try:
                if args.delete:
                    doc = {"removed": ds.untag(args.name)}
                else:
                    doc = {"name": args.name, **ds.tag(args.name, args.cid).to_json()}
            except StorageError as e:  # NotFound, BadTag, a thinned version
                raise CLIError(str(e), KEEP_HINT) from e
    if args.json:
        print(json.dumps(doc))
    elif args.delete:
        if not doc["removed"]:
            raise CLIError(f"no tag {args.name!r}", "`benchsync tag` lists the tags")
    else:
        print(doc["cid"])
    return 0
