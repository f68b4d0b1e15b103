"""Query answers as JSON: the one conversion the control API, the coordinator and the CLI share.

Arrow values become plain JSON: timestamps and dates as ISO 8601, intervals as
seconds, decimals as numbers, bytes as hex, NaN as null and infinities as
strings (JSON has neither).
"""

from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal
from typing import Any

import pyarrow as pa


def json_value(value: Any) -> Any:
    """One value of an answer, JSON-ready."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return value


def table_json(table: pa.Table) -> dict[str, Any]:
    """An Arrow table as `{"columns": [...], "types": [...], "rows": [[...], ...]}`."""
    names = table.column_names
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    rows = [[json_value(col[r]) for col in columns] for r in range(table.num_rows)]
    return {"columns": names, "types": [str(t) for t in table.schema.types], "rows": rows}
