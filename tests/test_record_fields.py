"""One record-field table: the `benchsync record` flags are the record rules' flags.

A field added to a record kind without a flag, a flag naming no field, or a
flag whose type disagrees with the field's rule fails here.
"""

from __future__ import annotations

import argparse

import pytest

from benchsync.daemon.cli import record as cli_record
from benchsync.storage.records import FIELD_FLAGS, RULES

KINDS = ("perf", "compat", "test")
NOT_FLAGS = {"created_at", "assertions"}  # set by the database, or nested records


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchsync")
    cli_record.register(p.add_subparsers(dest="command"))
    return p


def test_every_field_table_entry_names_a_field_and_every_field_but_two_has_a_flag() -> None:
    names = {rule.name for kind in KINDS for rule in RULES[kind]}
    assert set(FIELD_FLAGS) == names - NOT_FLAGS
    flags = [flag for flag, _ in FIELD_FLAGS.values()]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize("kind", KINDS)
def test_flags_parse_into_the_fields_with_the_rules_types(
    kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flagged = [rule for rule in RULES[kind] if rule.flag is not None]
    argv = ["record", kind]
    sample = {"str": "x", "json": "{}", "int": "3", "float": "2.5"}
    for rule in flagged:
        argv += [rule.flag] if rule.kind == "bool" else [rule.flag, sample[rule.kind]]
    args = parser().parse_args(argv)
    want = {"str": "x", "json": "{}", "int": 3, "float": 2.5, "bool": True}
    got = {r.name: getattr(args, r.name) for r in flagged}
    assert got == {r.name: want[r.kind] for r in flagged}
    with pytest.raises(SystemExit):
        parser().parse_args(["record", kind, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for rule in flagged:
        assert rule.flag in text and rule.help in text
    bools = [r for r in flagged if r.kind == "bool"]
    if bools:
        args = parser().parse_args(["record", kind, "--no-" + bools[0].flag[2:]])
        assert getattr(args, bools[0].name) is False
