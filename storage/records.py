"""Benchmark records as the Python API, JSONL files and the CLI name them, and their validation.

This module owns what a valid record is. Each record kind (`perf`, `compat`,
`test`) is a frozen dataclass whose fields carry their rule (type, required,
minimum, allowed values) and the database column they are stored in. The same
rules run two ways: per record in Python (`validate`, used by the dataclasses,
the `store_*` methods and list/JSONL ingest) and per column on an Arrow table
(`validate_arrow`, used by Arrow ingest), so that a bad value is rejected with
the same `InvalidRecord(field, value, reason)` whichever way it came in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from benchsync.storage.errors import InvalidRecord

FLOAT32_MAX = 3.4028234663852886e38  # largest finite value a DuckDB FLOAT column holds
INT32_MAX = 2**31 - 1  # DuckDB INTEGER columns
TEST_STATUSES = ("pass", "fail", "error", "skip")

# Value kinds a field can have, and the Arrow type each is normalised to.
ARROW_TYPES: dict[str, pa.DataType] = {
    "str": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "json": pa.string(),  # JSON text
    "timestamp": pa.timestamp("us"),
}


@dataclass(frozen=True)
class Rule:
    """How one record field is checked and where it is stored."""

    name: str
    kind: str  # a key of ARROW_TYPES, or "assertions"
    required: bool = False
    default: Any = None
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    column: str | None = None  # None: not stored in the kind's own table (a lookup key)
    flag: str | None = None  # the CLI flag (`benchsync record`); None: not settable there
    help: str = ""  # the flag's --help text


def _f(kind: str, *, required: bool = False, default: Any = None, minimum: float | None = None,
       choices: tuple[str, ...] | None = None, column: str | None = "") -> Any:
    """A dataclass field carrying its `Rule`; column "" means "same name as the field"."""
    meta = {"kind": kind, "required": required, "default": default, "minimum": minimum,
            "choices": choices, "column": column}
    if kind in ("json", "assertions"):
        return field(default=None, metadata=meta)
    return field(default=default, metadata=meta)


class Record:
    """Base of the record dataclasses: validates and normalises on construction."""

    KIND: ClassVar[str]

    def __post_init__(self) -> None:
        clean = validate(self.KIND, {f.name: getattr(self, f.name) for f in fields(self)})  # type: ignore[arg-type]
        for name, value in clean.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        """Build from a mapping of keyword names; unknown keys raise `InvalidRecord`."""
        check_known_fields(cls.KIND, data)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class PerformanceResult(Record):
    KIND: ClassVar[str] = "perf"
    model_name: str | None = _f("str", required=True, column=None)
    hardware_type: str | None = _f("str", required=True, column=None)
    device_name: str | None = _f("str", column=None)
    model_family: str | None = _f("str", column=None)
    batch_size: int | None = _f("int", default=1, minimum=1)
    precision: str | None = _f("str", default="fp32")
    test_case: str | None = _f("str", default="default")
    throughput: float | None = _f("float", minimum=0, column="throughput_items_per_second")
    latency_avg: float | None = _f("float", minimum=0, column="average_latency_ms")
    latency_p90: float | None = _f("float", minimum=0, column="latency_p90_ms")
    latency_p95: float | None = _f("float", minimum=0, column="latency_p95_ms")
    latency_p99: float | None = _f("float", minimum=0, column="latency_p99_ms")
    memory_peak: float | None = _f("float", minimum=0, column="memory_peak_mb")
    total_time_seconds: float | None = _f("float", minimum=0)
    iterations: int | None = _f("int", minimum=0)
    warmup_iterations: int | None = _f("int", minimum=0)
    run_id: int | None = _f("int", minimum=1)
    metrics: dict[str, Any] | None = _f("json")
    created_at: datetime | None = _f("timestamp")


@dataclass(frozen=True, kw_only=True)
class HardwareCompatibility(Record):
    KIND: ClassVar[str] = "compat"
    model_name: str | None = _f("str", required=True, column=None)
    hardware_type: str | None = _f("str", required=True, column=None)
    device_name: str | None = _f("str", column=None)
    model_family: str | None = _f("str", column=None)
    is_compatible: bool | None = _f("bool", required=True)
    # Unset, these two follow is_compatible (a compatible model was detected and initialised).
    detection_success: bool | None = _f("bool")
    initialization_success: bool | None = _f("bool")
    error_message: str | None = _f("str")
    error_type: str | None = _f("str")
    suggested_fix: str | None = _f("str")
    workaround_available: bool | None = _f("bool")
    compatibility_score: float | None = _f("float", minimum=0)
    run_id: int | None = _f("int", minimum=1)
    metadata: dict[str, Any] | None = _f("json")
    created_at: datetime | None = _f("timestamp")


@dataclass(frozen=True, kw_only=True)
class Assertion(Record):
    KIND: ClassVar[str] = "assertion"
    assertion_name: str | None = _f("str", required=True)
    passed: bool | None = _f("bool", required=True)
    expected_value: str | None = _f("str")
    actual_value: str | None = _f("str")
    message: str | None = _f("str")


@dataclass(frozen=True, kw_only=True)
class IntegrationTestResult(Record):
    KIND: ClassVar[str] = "test"
    test_module: str | None = _f("str", required=True)
    test_class: str | None = _f("str")
    test_name: str | None = _f("str", required=True)
    status: str | None = _f("str", required=True, choices=TEST_STATUSES)
    execution_time_seconds: float | None = _f("float", minimum=0)
    model_name: str | None = _f("str", column=None)
    model_family: str | None = _f("str", column=None)
    hardware_type: str | None = _f("str", column=None)
    device_name: str | None = _f("str", column=None)
    error_message: str | None = _f("str")
    error_traceback: str | None = _f("str")
    assertions: list[Any] | None = _f("assertions", column=None)
    run_id: int | None = _f("int", minimum=1)
    metadata: dict[str, Any] | None = _f("json")
    created_at: datetime | None = _f("timestamp")


RECORD_TYPES: dict[str, type[Record]] = {
    "perf": PerformanceResult,
    "compat": HardwareCompatibility,
    "test": IntegrationTestResult,
    "assertion": Assertion,
}
KIND_ALIASES = {"performance": "perf", "compatibility": "compat", "integration": "test"}

# The CLI flag and help of each record field (`benchsync record KIND --flag`), by field
# name: a name means the same in every kind. A field missing here is not a flag
# (created_at, the nested assertions); "bool" fields become --flag/--no-flag.
FIELD_FLAGS: dict[str, tuple[str, str]] = {
    "model_name": ("--model", "model name (created on first use)"),
    "model_family": ("--model-family", "model family, e.g. bert"),
    "hardware_type": ("--hardware", "hardware type, e.g. cuda, cpu, rocm"),
    "device_name": ("--device", "device name, e.g. 'NVIDIA A100'"),
    "batch_size": ("--batch-size", "batch size (default 1)"),
    "precision": ("--precision", "numeric precision (default fp32)"),
    "test_case": ("--test-case", "test case (default 'default')"),
    "throughput": ("--throughput", "items per second"),
    "latency_avg": ("--latency-avg", "mean latency, ms"),
    "latency_p90": ("--latency-p90", "90th percentile latency, ms"),
    "latency_p95": ("--latency-p95", "95th percentile latency, ms"),
    "latency_p99": ("--latency-p99", "99th percentile latency, ms"),
    "memory_peak": ("--memory-peak", "peak memory, MB"),
    "total_time_seconds": ("--total-time", "total time, seconds"),
    "iterations": ("--iterations", "measured iterations"),
    "warmup_iterations": ("--warmup-iterations", "warm-up iterations"),
    "metrics": ("--metrics", "extra metrics as a JSON object"),
    "is_compatible": ("--compatible", "the model works on this hardware"),
    "detection_success": ("--detection-success", "hardware detected (default: --compatible)"),
    "initialization_success": ("--initialization-success",
                               "model initialised (default: --compatible)"),
    "error_message": ("--error-message", "error seen"),
    "error_type": ("--error-type", "error class"),
    "suggested_fix": ("--suggested-fix", "what to try"),
    "workaround_available": ("--workaround-available", "a workaround exists"),
    "compatibility_score": ("--score", "compatibility score"),
    "metadata": ("--metadata", "extra metadata as a JSON object"),
    "test_module": ("--test-module", "test module"),
    "test_class": ("--test-class", "test class"),
    "test_name": ("--test-name", "test name"),
    "status": ("--status", "pass, fail, error or skip"),
    "execution_time_seconds": ("--execution-time", "seconds"),
    "error_traceback": ("--error-traceback", "traceback text"),
    "run_id": ("--run-id", "id of an existing test run"),
}  # fmt: skip

RULES: dict[str, tuple[Rule, ...]] = {
    kind: tuple(
        Rule(
            name=f.name,
            kind=f.metadata["kind"],
            required=f.metadata["required"],
            default=f.metadata["default"],
            minimum=f.metadata["minimum"],
            choices=f.metadata["choices"],
            column=f.name if f.metadata["column"] == "" else f.metadata["column"],
            flag=FIELD_FLAGS.get(f.name, (None, ""))[0],
            help=FIELD_FLAGS.get(f.name, (None, ""))[1],
        )
        for f in fields(cls)  # type: ignore[arg-type]
    )
    for kind, cls in RECORD_TYPES.items()
}


def record_kind(kind: str) -> str:
    """Normalise a kind name ("perf", "performance", ...); raises `InvalidRecord` if unknown."""
    k = KIND_ALIASES.get(kind, kind)
    if k not in ("perf", "compat", "test"):
        raise InvalidRecord("kind", kind, "expected one of perf, compat, test")
    return k


def check_known_fields(kind: str, data: Mapping[str, Any]) -> None:
    known = {r.name for r in RULES[kind]}
    for key in data:
        if key not in known:
            raise InvalidRecord(
                str(key), data[key],
                f"unknown field; {kind} records take {', '.join(sorted(known))}"
            )


def check_value(rule: Rule, value: Any) -> Any:
    """Return the normalised value of one field, or raise `InvalidRecord`."""
    if value is None:
        if rule.required:
            raise InvalidRecord(rule.name, value, "is required")
        return rule.default
    kind = rule.kind
    if kind == "str":
        if not isinstance(value, str):
            raise InvalidRecord(rule.name, value, f"expected a string, got {type(value).__name__}")
        if rule.required and not value.strip():
            raise InvalidRecord(rule.name, value, "is required and must not be blank")
        if rule.choices is not None and value not in rule.choices:
            raise InvalidRecord(rule.name, value, f"expected one of {'|'.join(rule.choices)}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidRecord(rule.name, value,
                                f"expected true/false, got {type(value).__name__}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRecord(rule.name, value,
                                f"expected an integer, got {type(value).__name__}")
        if abs(value) > INT32_MAX:
            raise InvalidRecord(rule.name, value, f"out of range (|value| <= {INT32_MAX})")
        if rule.minimum is not None and value < rule.minimum:
            raise InvalidRecord(rule.name, value, f"must be >= {rule.minimum:g}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRecord(rule.name, value, f"expected a number, got {type(value).__name__}")
        v = float(value)
        if not math.isfinite(v):
            raise InvalidRecord(rule.name, value, "must be a finite number (not NaN or infinity)")
        if abs(v) > FLOAT32_MAX:
            raise InvalidRecord(rule.name, value, f"out of range (|value| <= {FLOAT32_MAX:g})")
        if rule.minimum is not None and v < rule.minimum:
            raise InvalidRecord(rule.name, value, f"must be >= {rule.minimum:g}")
        return v
    if kind == "json":
        if isinstance(value, str):  # already JSON text (e.g. from the CLI)
            try:
                value = json.loads(value)
            except ValueError as e:
                raise InvalidRecord(rule.name, value, f"not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise InvalidRecord(rule.name, value, "expected a JSON object")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidRecord(rule.name, value, f"not JSON-serialisable: {e}") from None
        return value
    if kind == "timestamp":
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                raise InvalidRecord(rule.name, value, "expected an ISO 8601 timestamp") from None
        if not isinstance(value, datetime):
            raise InvalidRecord(rule.name, value, "expected a timestamp")
        if value.tzinfo is not None:  # stored as naive UTC
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value
    if kind == "assertions":
        if not isinstance(value, list | tuple):
            raise InvalidRecord(rule.name, value, "expected a list of assertions")
        out = []
        for item in value:
            if isinstance(item, Assertion):
                out.append(item.to_dict())
            elif isinstance(item, Mapping):
                check_known_fields("assertion", item)
                out.append(validate("assertion", item))
            else:
                raise InvalidRecord(rule.name, item, "each assertion must be an object")
        return out
    raise AssertionError(f"unknown rule kind {kind}")  # a bug in RULES, not in the input


def validate(kind: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """Return the record's fields normalised (every field present), or raise `InvalidRecord`.

    Unknown keys are not checked here (see `check_known_fields`).
    """
    out = {rule.name: check_value(rule, data.get(rule.name)) for rule in RULES[kind]}
    if kind == "compat":
        for name in ("detection_success", "initialization_success"):
            if out[name] is None:
                out[name] = out["is_compatible"]
    if out.get("device_name") is not None and out.get("hardware_type") is None:
        raise InvalidRecord("device_name", out["device_name"], "given without hardware_type")
    if out.get("model_family") is not None and out.get("model_name") is None:
        raise InvalidRecord("model_family", out["model_family"], "given without model_name")
    return out


# Which Arrow column types each field kind accepts (and casts losslessly).
_ACCEPTS = {
    "str": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    "json": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    "int": pa.types.is_integer,
    "float": lambda t: pa.types.is_integer(t) or pa.types.is_floating(t),
    "bool": pa.types.is_boolean,
    "timestamp": lambda t: pa.types.is_timestamp(t) or pa.types.is_string(t),
}


def _first_bad(column: pa.ChunkedArray | pa.Array, mask: pa.ChunkedArray | pa.Array) -> Any:
    """The first value of `column` where `mask` is true (for the error message)."""
    idx = pc.index(mask, True).as_py()
    return column[idx].as_py() if idx >= 0 else None


def validate_arrow(kind: str, table: pa.Table) -> pa.Table:
    """Vectorised `validate` of every row of an Arrow table of records.

    Returns a table with one column per flat field of `kind`, in `RULES` order,
    of the normalised Arrow types (absent columns filled with defaults). The
    `assertions` column of test records, if any, is passed through unchecked
    for the caller to validate. Raises `InvalidRecord` naming the first bad value.
    """
    rules = RULES[kind]
    known = {r.name for r in rules}
    for name in table.column_names:
        if name not in known:
            raise InvalidRecord(name, None, f"unknown column; {kind} records take {sorted(known)}")
    n = table.num_rows
    columns: dict[str, pa.ChunkedArray | pa.Array] = {}
    for rule in rules:
        if rule.kind == "assertions":
            continue
        target = ARROW_TYPES[rule.kind]
        if rule.name not in table.column_names:
            if rule.required:
                raise InvalidRecord(rule.name, None, "is required (column missing)")
            columns[rule.name] = pa.array([rule.default] * n, type=target)
            continue
        col = table.column(rule.name)
        if rule.kind == "json" and not (pa.types.is_string(col.type) or pa.types.is_null(col.type)):
            # Nested Arrow values (structs, maps): serialise them one by one.
            col = pa.array([None if v is None else json.dumps(v) for v in col.to_pylist()],
                           type=pa.string())
        if not pa.types.is_null(col.type) and not _ACCEPTS[rule.kind](col.type):
            raise InvalidRecord(rule.name, col[0].as_py() if n else None,
                                f"column has Arrow type {col.type}, expected {target}")
        try:
            col = col.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InvalidRecord(rule.name, None, f"cannot be read as {target}: {e}") from None
        nulls = col.is_null()
        if rule.required and pc.any(nulls).as_py():
            raise InvalidRecord(rule.name, None, "is required")
        if rule.default is not None:
            col = col.fill_null(rule.default)
        if rule.kind == "str" and rule.required:
            blank = pc.equal(pc.utf8_trim_whitespace(col), "")
            if pc.any(blank).as_py():
                raise InvalidRecord(rule.name, _first_bad(col, blank),
                                    "is required and must not be blank")
        if rule.choices is not None:
            bad = pc.invert(pc.is_in(col, value_set=pa.array(rule.choices)))
            bad = pc.and_(bad, pc.invert(col.is_null()))
            if pc.any(bad).as_py():
                raise InvalidRecord(rule.name, _first_bad(col, bad),
                                    f"expected one of {'|'.join(rule.choices)}")
        if rule.kind in ("int", "float"):
            if rule.kind == "float":
                bad = pc.invert(pc.is_finite(col))
                if pc.any(bad).as_py():
                    raise InvalidRecord(rule.name, _first_bad(col, bad),
                                        "must be a finite number (not NaN or infinity)")
            limit = FLOAT32_MAX if rule.kind == "float" else INT32_MAX
            bad = pc.greater(pc.abs(col), limit)
            if pc.any(bad).as_py():
                raise InvalidRecord(rule.name, _first_bad(col, bad),
                                    f"out of range (|value| <= {limit:g})")
            if rule.minimum is not None:
                bad = pc.less(col, rule.minimum)
                if pc.any(bad).as_py():
                    raise InvalidRecord(rule.name, _first_bad(col, bad),
                                        f"must be >= {rule.minimum:g}")
        columns[rule.name] = col
    if kind == "compat":
        for name in ("detection_success", "initialization_success"):
            columns[name] = pc.coalesce(columns[name], columns["is_compatible"])
    for dependent, key in (("device_name", "hardware_type"), ("model_family", "model_name")):
        if dependent in columns and key in columns:
            bad = pc.and_(columns[key].is_null(), pc.invert(columns[dependent].is_null()))
            if pc.any(bad).as_py():
                raise InvalidRecord(dependent, _first_bad(columns[dependent], bad),
                                    f"given without {key}")
    return pa.table(columns)


def arrow_schema(kind: str) -> pa.Schema:
    """The schema `validate_arrow` returns for `kind` (flat fields only)."""
    return pa.schema([(r.name, ARROW_TYPES[r.kind]) for r in RULES[kind] if r.kind != "assertions"])
