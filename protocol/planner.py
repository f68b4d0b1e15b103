"""The distributed query planner: one SELECT becomes a per-node part and a merge part.

This module owns the decision of *how* a cross-node aggregate query runs so that
the merged answer equals what one DuckDB holding every node's rows would return.
It works on the parsed AST (the JSON document DuckDB's `json_serialize_sql`
returns) and produces ASTs; it never imports duckdb (layering: `protocol/` is
pure). Parsing and rendering SQL need DuckDB's own parser: `plan_sql` takes
them as a `SqlDialect` (`benchsync.storage.distquery.DUCKDB` is the one the
daemon passes) and returns a `QueryPlan` whose SQL is rendered; storage
executes the node part on each node and the merge part at the coordinator.

Two strategies:

- ``decomposed``: every aggregate has an exact merge (COUNT, COUNT(x), SUM,
  MIN, MAX, AVG as sum+count, VAR/STDDEV as count+mean+M2 merged with Chan's
  parallel formula, BOOL_AND/OR). Each node runs FROM/WHERE/GROUP BY and ships
  one row of partial states per group; the coordinator groups the partial rows
  by the group *values* and applies HAVING, ORDER BY, LIMIT and DISTINCT.
- ``rows``: anything else (median, quantiles, COUNT(DISTINCT), window functions,
  GROUPING SETS, plain row queries). Each node runs FROM/WHERE (joins happen
  inside a node, whose local ids are consistent) and ships only the columns
  the rest of the query references; the coordinator runs the rest of the query
  over the union. Still exact, just more bytes. The plan's `reason` says why.

- ``shipped``: what neither splits (CTEs, derived tables, scalar and IN
  subqueries, set operations, table functions, SELECT * over a join). Each
  node ships the columns the query names of every base table it reads
  (`ShippedTable`: ``SELECT COLUMNS('(?i)^(origin|...)$') FROM t``, rows in
  the replicas scope's shape: an `origin` column and origin-tagged ids, so
  joins stay within one origin); the coordinator runs the original query over
  the union of each table. Exact whatever the SQL, and the most bytes: the
  daemon bounds them (`query_ship_max_bytes`).

Joins are evaluated inside each node in the first two strategies: cross-node
grouping is by values, never by local ids.

The node part reads the node's tables; the merge part reads one table named
`PARTIALS_TABLE` holding the union of the nodes' answers (``shipped``: the
base tables' own names, each the union of the nodes' shipped rows).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

PARTIALS_TABLE = "partials"  # the coordinator's name for the union of node answers
PREFIX = "__bs_"  # prefix of planner-made column names; user aliases never start with it
MAX_SQL_AST_DEPTH = 200  # nesting levels; deeper ASTs are refused (recursion guard)
ORIGIN_COLUMN = "origin"  # every shipped table carries it (the replicas scope's shape)
# Names a shipped table or column may have: pasted into the node's SQL, so nothing else.
_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Aggregates with an exact merge, by DuckDB function name.
DECOMPOSABLE = frozenset(
    {
        "count_star", "count", "sum", "min", "max", "avg", "mean",
        "var_samp", "var_pop", "variance", "stddev", "stddev_samp", "stddev_pop",
        "bool_and", "bool_or",
    }
)  # fmt: skip
# Duplicates do not change these, so their DISTINCT form merges the same way.
_DISTINCT_SAFE = frozenset({"min", "max", "bool_and", "bool_or"})

# Aggregate names known without asking DuckDB (distquery passes the full catalog
# from `duckdb_functions()`); used to tell an unknown aggregate from a scalar.
DEFAULT_AGGREGATES = DECOMPOSABLE | frozenset(
    {
        "median", "quantile", "quantile_cont", "quantile_disc", "mode", "mad",
        "approx_count_distinct", "approx_quantile", "string_agg", "group_concat",
        "list", "array_agg", "first", "last", "any_value", "arbitrary", "arg_min",
        "arg_max", "argmin", "argmax", "min_by", "max_by", "product", "histogram",
        "entropy", "kurtosis", "skewness", "corr", "covar_pop", "covar_samp",
        "regr_slope", "regr_intercept", "regr_r2", "fsum", "sumkahan", "kahan_sum",
        "favg", "bit_and", "bit_or", "bit_xor", "count_if", "countif", "geomean",
        "geometric_mean", "bitstring_agg", "reservoir_quantile",
    }
)  # fmt: skip

Strategy = Literal["decomposed", "rows", "shipped"]
NameOf = Callable[[dict[str, Any]], str]


class PlanError(ValueError):
    """The caller's SQL cannot run across nodes (not a single plain SELECT, or a
    construct that would be evaluated per node); the message says what to change."""


class _NotDecomposable(Exception):
    """Internal: this query needs the `rows` strategy; the message is the reason."""


class _NeedsShipping(Exception):
    """Internal: this query needs the `shipped` strategy; the message is the reason."""


@dataclass(frozen=True)
class ShippedTable:
    """One base table every node ships for a `shipped` plan.

    `sql` is what each node runs over its dataset (the replicas scope's
    shape); `columns` the lower-case names it keeps (always `origin`), or
    None for every column. The coordinator loads the union of the nodes'
    answers under `table`.
    """

    table: str
    columns: tuple[str, ...] | None
    sql: str


@dataclass(frozen=True)
class AstPlan:
    """How one query runs across nodes, as ASTs (what the pure planner decides).

    `node_ast`/`merge_ast` are `json_serialize_sql`-shaped documents;
    `output_columns` are the names of the final answer's columns and
    `partial_columns` those of every node's partial answer.
    """

    strategy: Strategy
    reason: str
    node_ast: dict[str, Any]
    merge_ast: dict[str, Any]
    output_columns: tuple[str, ...]
    partial_columns: tuple[str, ...] = ()
    shipped: tuple[ShippedTable, ...] = ()


@dataclass(frozen=True)
class QueryPlan:
    """A plan ready to run: the node part and the merge part as SQL text.

    Every node runs `node_sql` over its own tables and answers with columns
    `partial_columns`; the coordinator runs `merge_sql` over one table named
    `PARTIALS_TABLE`, the union of those answers, giving `output_columns`.
    A `shipped` plan has no `node_sql`: every node runs each of `shipped`'s
    queries, and `merge_sql` (the caller's query) reads the union of each.
    """

    strategy: Strategy
    reason: str
    node_sql: str
    merge_sql: str
    output_columns: tuple[str, ...]
    partial_columns: tuple[str, ...]
    shipped: tuple[ShippedTable, ...] = ()

    def node_parts(self) -> tuple[tuple[str, str], ...]:
        """(table name at the coordinator, SQL every node runs) of each node part."""
        if self.strategy == "shipped":
            return tuple((t.table, t.sql) for t in self.shipped)
        return ((PARTIALS_TABLE, self.node_sql),)

    @property
    def ships_rows(self) -> bool:
        """True when the node parts answer with rows, not one row per group
        (`rows`, `shipped`): they are bounded by bytes (`query_ship_max_bytes`,
        a query request with purpose "ship"), not by the answer's row limit."""
        return self.strategy in ("rows", "shipped")


class SqlDialect(Protocol):
    """The SQL text <-> AST conversions the planner needs (DuckDB's parser)."""

    def parse(self, sql: str) -> dict[str, Any]:
        """The `json_serialize_sql` document of one read-only SELECT."""

    def render(self, ast: Mapping[str, Any]) -> str:
        """SQL text of a `json_serialize_sql`-shaped document."""

    def expression_name(self, expr: dict[str, Any]) -> str:
        """The column name of an unaliased select item (its SQL text)."""

    def aggregate_names(self) -> frozenset[str]:
        """Every aggregate function name the dialect knows."""


# ---------------------------------------------------------------------------
# AST constructors. DuckDB's deserializer needs every property, so these spell
# out the full shape `json_serialize_sql` produces (DuckDB 1.x/2.x).


def _doc(node: dict[str, Any]) -> dict[str, Any]:
    return {"error": False, "statements": [{"node": node, "named_param_map": []}]}


def col(*names: str) -> dict[str, Any]:
    return {"class": "COLUMN_REF", "type": "COLUMN_REF", "alias": "", "column_names": list(names)}


def const_int(value: int) -> dict[str, Any]:
    return {
        "class": "CONSTANT",
        "type": "VALUE_CONSTANT",
        "alias": "",
        "literal": {"kind": "INTEGER", "text": str(value)},
    }


def _const(kind: str, text: str) -> dict[str, Any]:
    return {"class": "CONSTANT", "type": "VALUE_CONSTANT", "alias": "",
            "literal": {"kind": kind, "text": text}}  # fmt: skip


def cast(expr: dict[str, Any], type_name: str) -> dict[str, Any]:
    return {
        "class": "CAST",
        "type": "OPERATOR_CAST",
        "alias": "",
        "child": expr,
        "try_cast": False,
        "type_expr": {
            "class": "TYPE", "type": "TYPE", "alias": "", "catalog": "", "schema": "",
            "type_name": type_name, "children": [], "qualified_name": {"path": [type_name]},
        },
    }  # fmt: skip


def func(name: str, *args: dict[str, Any], operator: bool = False) -> dict[str, Any]:
    return {
        "class": "FUNCTION",
        "type": "FUNCTION",
        "alias": "",
        "function_name": name,
        "schema": "",
        "filter": None,
        "order_bys": {"type": "ORDER_MODIFIER", "orders": []},
        "distinct": False,
        "is_operator": operator,
        "export_state": False,
        "catalog": "",
        "arguments": [{"name": "", "expression": a} for a in args],
        "qualified_name": {"path": [name]},
        "is_legacy_function_call": False,
    }


def _op(name: str, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return func(name, a, b, operator=True)


def _window_sum(expr: dict[str, Any], partitions: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "class": "WINDOW", "type": "WINDOW_AGGREGATE", "alias": "", "function_name": "sum",
        "schema": "", "catalog": "", "partitions": partitions, "orders": [],
        "start": "UNBOUNDED_PRECEDING", "end": "CURRENT_ROW_RANGE", "start_expr": None,
        "end_expr": None, "offset_expr": None, "default_expr": None, "ignore_nulls": False,
        "filter_expr": None, "exclude_clause": "NO_OTHER", "distinct": False, "arg_orders": [],
        "has_ignore_nulls": False, "arguments": [{"name": "", "expression": expr}],
        "qualified_name": {"path": ["sum"]}, "is_legacy_function_call": False,
    }  # fmt: skip


def _base_table(name: str, alias: str = "") -> dict[str, Any]:
    return {
        "type": "BASE_TABLE", "alias": alias, "sample": None, "schema_name": "",
        "table_name": name, "column_name_alias": [], "catalog_name": "", "at_clause": None,
        "qualified_name": {"path": [name]},
    }  # fmt: skip


def _subquery_table(node: dict[str, Any], alias: str) -> dict[str, Any]:
    return {"type": "SUBQUERY", "alias": alias, "sample": None,
            "subquery": {"node": node, "named_param_map": []}, "column_name_alias": []}  # fmt: skip


def _select_node(select_list: list[dict[str, Any]], from_table: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "SELECT_NODE", "modifiers": [], "cte_map": {"map": []},
        "select_list": select_list, "from_table": from_table, "where_clause": None,
        "group_expressions": [], "group_sets": [], "aggregate_handling": "STANDARD_HANDLING",
        "having": None, "sample": None, "qualify": None,
    }  # fmt: skip


def _star() -> dict[str, Any]:
    return {"class": "STAR", "type": "STAR", "alias": "", "relation_name": "", "exclude_list": [],
            "replace_list": [], "columns": False, "expr": None, "qualified_exclude_list": [],
            "rename_list": []}  # fmt: skip


def _aliased(expr: dict[str, Any], alias: str) -> dict[str, Any]:
    out = dict(expr)
    out["alias"] = alias
    return out


# ---------------------------------------------------------------------------
# AST inspection.


def _normalized(expr: Any) -> str:
    """A key equal for expressions that mean the same (positions, aliases and
    identifier case ignored): used to match GROUP BY keys and dedupe aggregates."""

    def strip(o: Any, depth: int = 0) -> Any:
        if depth > MAX_SQL_AST_DEPTH:
            raise PlanError("query nests too deeply; simplify it")
        if isinstance(o, dict):
            out = {}
            for k, v in o.items():
                if k in ("query_location", "query_location_length", "alias"):
                    continue
                if k in ("column_names", "function_name") and isinstance(v, list | str):
                    v = [s.lower() for s in v] if isinstance(v, list) else v.lower()
                out[k] = strip(v, depth + 1)
            return out
        if isinstance(o, list):
            return [strip(x, depth + 1) for x in o]
        return o

    return json.dumps(strip(expr), sort_keys=True)


def _walk(o: Any, depth: int = 0) -> Any:
    """Yield every expression dict (anything with a "class") inside `o`."""
    if depth > MAX_SQL_AST_DEPTH:
        raise PlanError("query nests too deeply; simplify it")
    if isinstance(o, dict):
        if "class" in o:
            yield o
        for v in o.values():
            yield from _walk(v, depth + 1)
    elif isinstance(o, list):
        for x in o:
            yield from _walk(x, depth + 1)


def _fname(expr: dict[str, Any]) -> str:
    return str(expr.get("function_name", "")).lower()


def _is_aggregate_call(expr: dict[str, Any], aggregates: frozenset[str]) -> bool:
    return expr.get("class") == "FUNCTION" and _fname(expr) in aggregates


def _has_aggregate(o: Any, aggregates: frozenset[str]) -> bool:
    return any(_is_aggregate_call(e, aggregates) for e in _walk(o))


def _check_from(table: dict[str, Any], depth: int = 0) -> None:
    kind = table.get("type")
    if kind == "BASE_TABLE":
        if table.get("sample") is not None:
            raise _NeedsShipping("TABLESAMPLE samples every node's rows at the coordinator")
        return
    if kind == "JOIN":
        _check_from(table["left"], depth + 1)
        _check_from(table["right"], depth + 1)
        return
    if kind == "EMPTY":
        raise _NeedsShipping("no FROM table: the query runs at the coordinator")
    what = {"SUBQUERY": "a derived table (subquery in FROM)",
            "TABLE_FUNCTION": "a table function"}.get(str(kind), f"a FROM item of type {kind}")
    raise _NeedsShipping(f"{what} is evaluated over every node's rows at the coordinator")


def _the_select(ast: Mapping[str, Any]) -> dict[str, Any]:
    if ast.get("error"):
        raise PlanError(f"not valid SQL: {ast.get('error_message', 'parse error')}")
    statements = ast.get("statements") or []
    if len(statements) != 1:
        raise PlanError(f"expected exactly one statement, got {len(statements)}")
    node = statements[0].get("node") or {}
    for e in _walk(node):
        if e.get("class") == "PARAMETER":
            raise PlanError("unbound query parameter; pass params (bind_parameters)")
    if node.get("type") != "SELECT_NODE":
        raise _NeedsShipping(f"a {node.get('type')} (UNION, ...) runs at the coordinator")
    if (node.get("cte_map") or {}).get("map"):
        raise _NeedsShipping("WITH (CTEs) are evaluated over every node's rows at the coordinator")
    if node.get("sample") is not None:
        raise _NeedsShipping("USING SAMPLE samples every node's rows at the coordinator")
    _check_from(node["from_table"])
    if any(e.get("class") == "SUBQUERY" for e in _walk(node)):
        raise _NeedsShipping("subqueries are evaluated over every node's rows at the coordinator")
    return copy.deepcopy(node)


# ---------------------------------------------------------------------------
# Parameters.


def bind_parameters(
    ast: Mapping[str, Any], params: Sequence[Any] | Mapping[str, Any]
) -> dict[str, Any]:
    """Return a copy of `ast` with `?`/`$1`/`$name` parameters replaced by constants.

    Supports None, bool, int, float and str values. Raises PlanError for a
    missing parameter or an unsupported value type.
    """

    def literal(value: Any) -> dict[str, Any]:
        if value is None:
            return _const("NULL_LITERAL", "")
        if isinstance(value, bool):
            return _const("BOOLEAN", "true" if value else "false")
        if isinstance(value, int):
            return _const("INTEGER", str(value))
        if isinstance(value, float):
            # via a string so that inf/nan and full precision survive
            return cast(_const("STRING", repr(value) if math.isfinite(value) else str(value)),
                        "DOUBLE")  # fmt: skip
        if isinstance(value, str):
            return _const("STRING", value)
        raise PlanError(f"parameter of type {type(value).__name__} is not supported; "
                        "pass None, bool, int, float or str")  # fmt: skip

    def sub(o: Any) -> Any:
        if isinstance(o, dict):
            if o.get("class") == "PARAMETER":
                ident = str(o.get("identifier", ""))
                try:
                    value = (params[ident] if isinstance(params, Mapping)
                             else params[int(ident) - 1])  # fmt: skip
                except (KeyError, IndexError, ValueError):
                    raise PlanError(f"no value for query parameter ${ident}") from None
                out = literal(value)
                return _aliased(out, o.get("alias", ""))
            return {k: sub(v) for k, v in o.items()}
        if isinstance(o, list):
            return [sub(x) for x in o]
        return o

    return sub(copy.deepcopy(ast))


# ---------------------------------------------------------------------------
# Planning.


def _default_name(expr: dict[str, Any], index: int) -> str:
    if expr.get("alias"):
        return str(expr["alias"])
    if expr.get("class") == "COLUMN_REF":
        return str(expr["column_names"][-1])
    return f"col{index}"


def _output_names(select_list: list[dict[str, Any]], name_of: NameOf | None) -> list[str]:
    names = []
    for i, e in enumerate(select_list):
        if e.get("alias") or e.get("class") == "COLUMN_REF" or name_of is None:
            names.append(_default_name(e, i))
        else:
            names.append(name_of(e))
    return names


def plan_query(
    ast: Mapping[str, Any],
    *,
    aggregates: frozenset[str] = DEFAULT_AGGREGATES,
    name_of: NameOf | None = None,
) -> AstPlan:
    """Plan one parsed SELECT (`json_serialize_sql` output) for execution across nodes.

    `aggregates` names every aggregate function (distquery passes DuckDB's
    catalog); `name_of` returns DuckDB's column name for an unaliased
    expression (its SQL text), so the merged answer has the original names.
    Returns an AstPlan; raises PlanError for SQL that is not one SELECT.
    """
    try:
        node = _the_select(ast)
    except _NeedsShipping as why:
        return _plan_shipped(ast, str(why))
    aggregates = frozenset(a.lower() for a in aggregates) | DECOMPOSABLE
    if any(e.get("class") == "STAR" for e in node["select_list"]):
        try:
            return _plan_rows(node, "SELECT * ships whole rows", name_of)
        except _NeedsShipping as why:
            return _plan_shipped(ast, str(why))
    is_aggregate = (
        bool(node["group_expressions"])
        or node["aggregate_handling"] == "FORCE_AGGREGATES"
        or _has_aggregate([node["select_list"], node["having"], node["modifiers"]], aggregates)
    )
    try:
        if not is_aggregate:
            return _plan_rows(node, "not an aggregate query: the rows are the answer", name_of)
        try:
            return _plan_decomposed(node, aggregates, name_of)
        except _NotDecomposable as why:
            return _plan_rows(node, str(why), name_of)
    except _NeedsShipping as why:
        return _plan_shipped(ast, str(why))


def plan_sql(
    sql: str, params: Sequence[Any] | Mapping[str, Any] | None, dialect: SqlDialect
) -> QueryPlan:
    """Plan `sql` for execution across nodes; returns a QueryPlan with its SQL rendered.

    `params` are bound into the plan as constants. Raises PlanError (a SELECT
    that cannot be split, or a bad parameter) and whatever `dialect.parse`
    raises for SQL that is not one read-only SELECT.
    """
    ast = dialect.parse(sql)
    if params:
        ast = bind_parameters(ast, params)
    aggregates = dialect.aggregate_names() | DEFAULT_AGGREGATES
    p = plan_query(ast, aggregates=aggregates, name_of=dialect.expression_name)
    if p.strategy == "shipped":  # the caller's own query, over the shipped tables
        merge_sql = dialect.render(p.merge_ast) if params else sql
        return QueryPlan(strategy=p.strategy, reason=p.reason, node_sql="",
                         merge_sql=merge_sql, output_columns=(), partial_columns=(),
                         shipped=p.shipped)  # fmt: skip
    return QueryPlan(
        strategy=p.strategy, reason=p.reason,
        node_sql=dialect.render(p.node_ast), merge_sql=dialect.render(p.merge_ast),
        output_columns=p.output_columns, partial_columns=p.partial_columns,
    )  # fmt: skip


def check_partial(plan: QueryPlan, index: int, columns: Sequence[str]) -> None:
    """Raise PlanError unless partial answer number `index` has the planned columns."""
    if plan.partial_columns and tuple(columns) != plan.partial_columns:
        raise PlanError(
            f"partial answer {index} has columns {list(columns)}, expected "
            f"{list(plan.partial_columns)}; the node ran a different plan"
        )


class _Rewriter:
    """Rewrites select/HAVING/ORDER BY expressions of an aggregate query into
    merge expressions over the partials, allocating the node's partial columns."""

    def __init__(self, group_keys: list[dict[str, Any]], aliases: set[str],
                 aggregates: frozenset[str]) -> None:  # fmt: skip
        self.group_index = {_normalized(g): i for i, g in enumerate(group_keys)}
        self.aliases = {a.lower() for a in aliases}
        self.aggregates = aggregates
        self.partials: list[dict[str, Any]] = []  # node select items (aliased)
        self.partial_names: dict[str, str] = {}  # normalized node expression -> column
        self.merged: dict[str, dict[str, Any]] = {}  # normalized aggregate -> merge expr
        self.window_columns: list[tuple[str, dict[str, Any]]] = []  # (name, expr over partials)

    def _partial(self, name: str, expr: dict[str, Any]) -> dict[str, Any]:
        key = _normalized(expr)  # STDDEV(x) and VAR_POP(x) ship one (n, mean, M2)
        if key not in self.partial_names:
            self.partial_names[key] = name
            self.partials.append(_aliased(expr, name))
        return col(self.partial_names[key])

    def rewrite(self, expr: Any, *, allow_alias: bool, depth: int = 0) -> Any:
        if depth > MAX_SQL_AST_DEPTH:
            raise PlanError("query nests too deeply; simplify it")
        if isinstance(expr, list):
            return [self.rewrite(x, allow_alias=allow_alias, depth=depth + 1) for x in expr]
        if not isinstance(expr, dict):
            return expr
        if "class" not in expr:  # containers: function arguments, CASE checks, orders
            return {k: self.rewrite(v, allow_alias=allow_alias, depth=depth + 1)
                    for k, v in expr.items()}  # fmt: skip
        cls = expr["class"]
        key = _normalized(expr)
        if key in self.group_index and cls != "CONSTANT":
            return _aliased(col(f"{PREFIX}g{self.group_index[key]}"), expr.get("alias", ""))
        if cls in ("CONSTANT", "TYPE"):
            return expr
        if cls == "WINDOW":
            raise _NotDecomposable("window functions need every row at the coordinator")
        if cls == "COLUMN_REF":
            names = expr["column_names"]
            if allow_alias and len(names) == 1 and names[0].lower() in self.aliases:
                return expr
            raise _NotDecomposable(
                f"column {'.'.join(names)} is used outside a GROUP BY key and outside "
                "an aggregate with an exact merge"
            )
        if cls == "FUNCTION" and _fname(expr) in self.aggregates:
            return _aliased(self._aggregate(expr, key), expr.get("alias", ""))
        return {k: self.rewrite(v, allow_alias=allow_alias, depth=depth + 1)
                for k, v in expr.items()}  # fmt: skip

    def _aggregate(self, expr: dict[str, Any], key: str) -> dict[str, Any]:
        name = _fname(expr)
        if key in self.merged:
            return copy.deepcopy(self.merged[key])
        if name not in DECOMPOSABLE:
            raise _NotDecomposable(f"{name}() has no exact merge of per-node results")
        if expr.get("distinct") and name not in _DISTINCT_SAFE:
            raise _NotDecomposable(f"{name}(DISTINCT ...) needs the distinct values of all nodes")
        if (expr.get("order_bys") or {}).get("orders"):
            raise _NotDecomposable(f"{name}() with ORDER BY inside needs every row")
        args = [a["expression"] for a in expr.get("arguments", [])]
        if any(_has_aggregate(a, self.aggregates) for a in args):
            raise _NotDecomposable(f"nested aggregate inside {name}()")
        flt = expr.get("filter")
        k = len(self.merged)
        base = f"{PREFIX}a{k}"

        def node_agg(fname: str, *a: dict[str, Any]) -> dict[str, Any]:
            f = func(fname, *copy.deepcopy(list(a)))
            f["filter"] = copy.deepcopy(flt)
            return f

        merged: dict[str, Any]
        if name in ("count_star", "count"):
            part = self._partial(base, node_agg(name, *args))
            # SUM of BIGINT counts is HUGEINT; DuckDB's COUNT is BIGINT. Never NULL:
            # groups exist only where rows do, and a global aggregate ships one row per node.
            merged = cast(func("sum", part), "BIGINT")
        elif name == "sum":
            merged = func("sum", self._partial(base, node_agg("sum", *args)))
        elif name in ("min", "max", "bool_and", "bool_or"):
            merged = func(name, self._partial(base, node_agg(name, *args)))
        elif name in ("avg", "mean"):
            s = self._partial(f"{base}_sum", cast(node_agg("sum", *args), "DOUBLE"))
            n = self._partial(f"{base}_n", node_agg("count", *args))
            merged = _op("/", func("sum", s), func("nullif", func("sum", n), const_int(0)))
        else:  # variance family: Chan et al.'s parallel merge of (n, mean, M2)
            n = self._partial(f"{base}_n", node_agg("count", *args))
            mean = self._partial(f"{base}_mean", node_agg("avg", *args))
            m2 = self._partial(
                f"{base}_m2", _op("*", node_agg("var_pop", *args), node_agg("count", *args))
            )
            gmean_name = f"{mean['column_names'][0]}_g"
            if gmean_name not in dict(self.window_columns):
                gmean = _op("/", _window_sum(_op("*", n, mean), []), _window_sum(n, []))
                self.window_columns.append((gmean_name, gmean))
            total_n = func("sum", n)
            dev = _op("-", mean, col(gmean_name))
            total_m2 = _op("+", func("sum", m2),
                           func("sum", _op("*", n, _op("*", dev, copy.deepcopy(dev)))))  # fmt: skip
            if name in ("var_pop", "stddev_pop"):
                merged = _op("/", total_m2, func("nullif", total_n, const_int(0)))
            else:
                denominator = func("nullif", _op("-", total_n, const_int(1)), const_int(0))
                merged = _op("/", total_m2, denominator)
            if name.startswith("stddev"):
                merged = func("sqrt", merged)
        self.merged[key] = merged
        return copy.deepcopy(merged)


def _group_keys(node: dict[str, Any], aggregates: frozenset[str]) -> list[dict[str, Any]]:
    if len(node["group_sets"]) > 1:
        raise _NotDecomposable("GROUPING SETS/ROLLUP/CUBE are run at the coordinator")
    select = node["select_list"]
    if node["aggregate_handling"] == "FORCE_AGGREGATES":  # GROUP BY ALL
        return [copy.deepcopy(e) for e in select if not _has_aggregate(e, aggregates)]
    aliases = {str(e["alias"]).lower(): e for e in select if e.get("alias")}
    keys = []
    for g in node["group_expressions"]:
        if g.get("class") == "CONSTANT" and g["literal"]["kind"] == "INTEGER":
            position = int(g["literal"]["text"])  # GROUP BY 1: a select-list position
            if not 1 <= position <= len(select):
                raise PlanError(f"GROUP BY position {position} is not in the select list")
            g = select[position - 1]
        elif g.get("class") == "COLUMN_REF" and len(g["column_names"]) == 1:
            # A bare name that is a select alias groups by that expression (we cannot
            # see the schema here; a table column with the same name would win in DuckDB).
            target = aliases.get(g["column_names"][0].lower())
            if target is not None:
                g = target
        keys.append(_aliased(copy.deepcopy(g), ""))
    return keys


def _plan_decomposed(
    node: dict[str, Any], aggregates: frozenset[str], name_of: NameOf | None
) -> AstPlan:
    if node.get("qualify") is not None:
        raise _NotDecomposable("QUALIFY filters on window functions over every row")
    keys = _group_keys(node, aggregates)
    names = _output_names(node["select_list"], name_of)
    rw = _Rewriter(keys, set(names), aggregates)
    select = [
        _aliased(rw.rewrite(e, allow_alias=False), names[i])
        for i, e in enumerate(node["select_list"])
    ]
    having = rw.rewrite(node["having"], allow_alias=True) if node["having"] else None
    modifiers = rw.rewrite(node["modifiers"], allow_alias=True)

    group_cols = [f"{PREFIX}g{i}" for i in range(len(keys))]
    node_part = _select_node(
        [_aliased(k, group_cols[i]) for i, k in enumerate(keys)] + rw.partials,
        node["from_table"],
    )
    node_part["where_clause"] = node["where_clause"]
    node_part["group_expressions"] = keys
    node_part["group_sets"] = [list(range(len(keys)))] if keys else []
    if not node_part["select_list"]:  # e.g. SELECT 1 FROM t GROUP BY ALL: one row per node
        node_part["select_list"] = [_aliased(func("count_star"), f"{PREFIX}rows")]

    source: dict[str, Any] = _base_table(PARTIALS_TABLE)
    if rw.window_columns:
        # The variance merge needs each group's overall mean next to each partial row.
        inner = _select_node(
            [_star()] + [_aliased(_partition(e, group_cols), n) for n, e in rw.window_columns],
            _base_table(PARTIALS_TABLE),
        )
        source = _subquery_table(inner, PARTIALS_TABLE)
    merge = _select_node(select, source)
    merge["group_expressions"] = [col(c) for c in group_cols]
    merge["group_sets"] = [list(range(len(group_cols)))] if group_cols else []
    merge["having"] = having
    merge["modifiers"] = modifiers
    partial_names = tuple(group_cols) + tuple(p["alias"] for p in rw.partials)
    return AstPlan(
        strategy="decomposed",
        reason="every aggregate has an exact merge of per-node partial states",
        node_ast=_doc(node_part),
        merge_ast=_doc(merge),
        output_columns=tuple(names),
        partial_columns=partial_names,
    )


def _partition(expr: dict[str, Any], group_cols: list[str]) -> dict[str, Any]:
    """Set the PARTITION BY of every window in `expr` to the group columns."""
    out = copy.deepcopy(expr)
    for e in _walk(out):
        if e.get("class") == "WINDOW":
            e["partitions"] = [col(c) for c in group_cols]
    return out


def _plan_rows(node: dict[str, Any], reason: str, name_of: NameOf | None) -> AstPlan:
    names = _output_names(node["select_list"], name_of)
    has_star = any(e.get("class") == "STAR" for e in _walk(node["select_list"]))
    if has_star:
        table = node["from_table"]
        if table["type"] != "BASE_TABLE":
            raise _NeedsShipping("SELECT * over a join runs at the coordinator")
        node_part = _select_node([_star()], table)
        node_part["where_clause"] = node["where_clause"]
        merge = copy.deepcopy(node)
        merge["from_table"] = _subquery_table(
            _select_node([_star()], _base_table(PARTIALS_TABLE)),
            table.get("alias") or table["table_name"],
        )
        merge["where_clause"] = None
        return AstPlan("rows", reason, _doc(node_part), _doc(merge), tuple(names))

    aliases = {n.lower() for n in names}
    refs: dict[str, int] = {}
    ref_exprs: list[dict[str, Any]] = []

    def rewrite(o: Any, allow_alias: bool) -> Any:
        if isinstance(o, list):
            return [rewrite(x, allow_alias) for x in o]
        if not isinstance(o, dict):
            return o
        if o.get("class") == "COLUMN_REF":
            cn = o["column_names"]
            if allow_alias and len(cn) == 1 and cn[0].lower() in aliases:
                return o
            key = _normalized(o)
            if key not in refs:
                refs[key] = len(refs)
                ref_exprs.append(_aliased(o, f"{PREFIX}c{refs[key]}"))
            return _aliased(col(f"{PREFIX}c{refs[key]}"), o.get("alias", ""))
        return {k: rewrite(v, allow_alias) for k, v in o.items()}

    merge = copy.deepcopy(node)
    merge["select_list"] = [
        _aliased(rewrite(e, False), names[i]) for i, e in enumerate(node["select_list"])
    ]
    merge["group_expressions"] = rewrite(node["group_expressions"], True)
    merge["having"] = rewrite(node["having"], True)
    merge["qualify"] = rewrite(node["qualify"], True)
    merge["modifiers"] = rewrite(node["modifiers"], True)
    merge["from_table"] = _base_table(PARTIALS_TABLE)
    merge["where_clause"] = None
    node_part = _select_node(
        ref_exprs or [_aliased(_const("BOOLEAN", "true"), f"{PREFIX}row")], node["from_table"]
    )
    node_part["where_clause"] = node["where_clause"]
    return AstPlan("rows", reason, _doc(node_part), _doc(merge), tuple(names),
                   partial_columns=tuple(e["alias"] for e in ref_exprs))  # fmt: skip


def _plan_shipped(ast: Mapping[str, Any], reason: str) -> AstPlan:
    """Every node ships the named columns of each base table the query reads;
    the coordinator runs the query itself over their unions (exact for any SELECT)."""
    tables: dict[str, dict[str, Any]] = {}  # lower-case name -> a BASE_TABLE reference
    ctes: set[str] = set()
    names: set[str] = {ORIGIN_COLUMN}  # every part of every column reference (a superset)
    bare: set[str] = set()  # one-part column references (`SELECT t FROM t`: the whole row)
    every_column = False

    def visit(o: Any, depth: int = 0) -> None:
        nonlocal every_column
        if depth > MAX_SQL_AST_DEPTH:
            raise PlanError("query nests too deeply; simplify it")
        if isinstance(o, list):
            for x in o:
                visit(x, depth + 1)
            return
        if not isinstance(o, dict):
            return
        if o.get("class") == "PARAMETER":
            raise PlanError("unbound query parameter; pass params (bind_parameters)")
        if o.get("class") == "STAR":  # *, t.*, COLUMNS(...): whichever columns exist
            every_column = True
        elif o.get("class") == "COLUMN_REF":
            names.update(str(n).lower() for n in o["column_names"])
            if len(o["column_names"]) == 1:
                bare.add(str(o["column_names"][0]).lower())
        elif o.get("type") == "BASE_TABLE" and "table_name" in o:
            tables.setdefault(str(o["table_name"]).lower(), o)
        elif o.get("type") == "JOIN":
            names.update(str(n).lower() for n in o.get("using_columns") or [])
            if o.get("ref_type") == "NATURAL":  # joins on every shared column
                every_column = True
        cte_map = o.get("cte_map")
        if not isinstance(cte_map, dict):
            cte_map = {}
        ctes.update(str(entry["key"]).lower() for entry in cte_map.get("map") or [])
        for v in o.values():
            visit(v, depth + 1)

    visit(ast.get("statements") or [])
    shipped = []
    for name, ref in sorted(tables.items()):
        if name in ctes:
            continue  # a CTE's name: evaluated at the coordinator from the tables it reads
        if (ref.get("schema_name") or "main").lower() != "main" or ref.get("catalog_name") \
                or ref.get("at_clause") is not None or not _PLAIN_NAME.match(name):
            raise PlanError(f"table {'.'.join(ref['qualified_name']['path'])} cannot be read "
                            "across nodes; name one of the benchmark tables")  # fmt: skip
        # A bare name equal to the table's (its whole row as a struct) needs every column.
        whole = every_column or name in bare or (ref.get("alias") or "").lower() in bare \
            or not all(_PLAIN_NAME.match(n) for n in names)
        columns = None if whole else tuple(sorted(names))
        # sql: `name` and every column name match _PLAIN_NAME (letters, digits, _),
        # so neither the quoted identifier nor the regex literal can be escaped.
        select = "*" if columns is None else f"COLUMNS('(?i)^({'|'.join(columns)})$')"
        shipped.append(ShippedTable(name, columns, f'SELECT {select} FROM "{name}"'))
    return AstPlan("shipped", reason, {}, copy.deepcopy(dict(ast)), (), shipped=tuple(shipped))
