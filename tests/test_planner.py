"""The pure planner and the query protocol messages (no DuckDB: ASTs are fixtures)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchsync.protocol import planner
from benchsync.protocol.query import (
    MAX_SQL_BYTES,
    QueryMessageError,
    QueryRequest,
    QueryResponse,
)

FIXTURES = Path(__file__).parent / "fixtures" / "planner_asts.json"


def asts() -> dict[str, dict]:
    return json.loads(FIXTURES.read_text())


def test_planner_imports_no_duckdb_trio_or_libp2p() -> None:
    source = Path(planner.__file__).read_text() + Path(
        planner.__file__).with_name("query.py").read_text()  # fmt: skip
    for name in ("duckdb", "trio", "libp2p"):
        assert f"import {name}" not in source


def test_group_by_with_avg_is_decomposed_into_sum_and_count() -> None:
    plan = planner.plan_query(asts()["avg_by_model"])
    assert plan.strategy == "decomposed"
    node = plan.node_ast["statements"][0]["node"]
    shipped = [e["alias"] for e in node["select_list"]]
    assert shipped == ["__bs_g0", "__bs_a0_sum", "__bs_a0_n", "__bs_a1"]  # a1: HAVING count(*)
    merge = plan.merge_ast["statements"][0]["node"]
    assert merge["from_table"]["table_name"] == planner.PARTIALS_TABLE
    assert plan.output_columns == ("model_name", "tput")
    # HAVING and LIMIT run at the coordinator only
    assert node["having"] is None and node["modifiers"] == []
    assert merge["having"] is not None and merge["modifiers"]


def test_median_falls_back_to_rows_with_reason() -> None:
    plan = planner.plan_query(asts()["median"])
    assert plan.strategy == "rows"
    assert "median" in plan.reason


def test_non_select_is_a_plan_error() -> None:
    with pytest.raises(planner.PlanError, match="one statement"):
        planner.plan_query(asts()["two_statements"])
    with pytest.raises(planner.PlanError, match="not valid SQL"):
        planner.plan_query({"error": True, "error_message": "syntax error at or near"})


def test_bind_parameters_replaces_every_parameter() -> None:
    bound = planner.bind_parameters(asts()["with_parameter"], [4])
    assert "PARAMETER" not in json.dumps(bound)
    with pytest.raises(planner.PlanError, match="no value"):
        planner.bind_parameters(asts()["with_parameter"], [])


# --- messages ------------------------------------------------------------------------

def test_request_round_trip() -> None:
    req = QueryRequest("SELECT 1", [1, "a", None, 2.5, True], timeout_s=3, max_rows=10,
                       max_bytes=1000)  # fmt: skip
    assert QueryRequest.from_bytes(req.to_bytes()) == req


@pytest.mark.parametrize("kwargs", [
    {"sql": ""}, {"sql": "x" * (MAX_SQL_BYTES + 1)}, {"timeout_s": 0}, {"timeout_s": 1e9},
    {"max_rows": -1}, {"max_bytes": True}, {"params": [object()]}, {"params": [float("nan")]},
])  # fmt: skip
def test_request_validates_its_fields(kwargs: dict) -> None:
    with pytest.raises(QueryMessageError):
        QueryRequest(**{"sql": "SELECT 1", **kwargs})


def test_response_round_trip_and_rules() -> None:
    ok = QueryResponse("ok", arrow_ipc=b"\x01\x02")
    assert QueryResponse.from_bytes(ok.to_bytes()) == ok
    err = QueryResponse.error("timeout", "too slow")
    assert QueryResponse.from_bytes(err.to_bytes()) == err
    with pytest.raises(QueryMessageError):
        QueryResponse("timeout", "x", b"data")
    with pytest.raises(QueryMessageError):
        QueryResponse("bogus")  # type: ignore[arg-type]


def test_truncated_and_corrupt_messages_are_rejected() -> None:
    good = QueryResponse("ok", arrow_ipc=b"abc").to_bytes()
    request = QueryRequest("SELECT 1").to_bytes()
    for bad in (good[:3], good[:-1], good + b"x", b"XXXX" + good[4:], request):
        with pytest.raises(QueryMessageError):
            QueryResponse.from_bytes(bad)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=300))
def test_decoders_never_crash_on_garbage(data: bytes) -> None:
    for cls in (QueryRequest, QueryResponse):
        with contextlib.suppress(QueryMessageError):
            cls.from_bytes(data)  # type: ignore[attr-defined]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 200))
def test_decoders_reject_every_prefix_of_a_request(cut: int) -> None:
    data = QueryRequest("SELECT count(*) FROM models", ["x"]).to_bytes()
    if cut < len(data):
        with pytest.raises(QueryMessageError):
            QueryRequest.from_bytes(data[:cut])
