"""Every f-string that builds SQL is audited (issue 17, finding 1).

DuckDB runs every statement in a string, so text pasted into SQL must be
either quoted by the one audited helper (`storage/sqlnames.py`: `ident`,
`literal`), a module constant (ALL_CAPS), or justified where it is written:
a `# sql:` comment in the function that builds it (above or on the f-string's
lines), or on one of the three lines above a module-level f-string, saying
why the interpolated text cannot come from outside or was quoted when it was
composed. This test reads the source, so a new f-string that pastes a
variable into SQL fails it until someone writes down why that is safe.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("storage", "protocol", "daemon")
# An f-string is SQL when it opens with a statement keyword, or is handed to a
# DuckDB call; other f-strings that mention SELECT are messages.
SQL_START = re.compile(
    r"^\s*\(?\s*(SELECT|INSERT|CREATE|COPY|DESCRIBE|ATTACH|DETACH|ALTER|DROP|UPDATE|DELETE|"
    r"PRAGMA|SET|WITH|SUMMARIZE)\b"
)
SQL_CALLS = {"execute", "executemany", "sql", "query"}
QUOTING_HELPERS = {"ident", "literal"}
JUSTIFICATION = "# sql:"
LOOKBACK = 3  # lines above a module-level f-string where its justification may stand


def _is_safe(value: ast.expr) -> bool:
    """Text from the audited quoting helpers or a module constant."""
    if isinstance(value, ast.Call):
        func = value.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        return name in QUOTING_HELPERS
    if isinstance(value, ast.Name):
        return value.id.isupper()
    if isinstance(value, ast.Attribute):
        return value.attr.isupper()
    return False


def _sql_fstrings(path: Path) -> list[tuple[int, str]]:
    """(line, source) of each f-string with SQL words that interpolates unaudited text."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    # Innermost enclosing function of each line: its first line bounds the justification.
    func_start: dict[int, int] = {}
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            for line in range(func.lineno, (func.end_lineno or func.lineno) + 1):
                func_start[line] = max(func_start.get(line, 0), func.lineno)
    handed_to_duckdb = {
        id(call.args[0])
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and call.args
        and getattr(call.func, "attr", None) in SQL_CALLS
    }  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.JoinedStr):
            continue
        first = node.values[0] if node.values else None
        opens_sql = isinstance(first, ast.Constant) and SQL_START.match(str(first.value))
        if not opens_sql and id(node) not in handed_to_duckdb:
            continue
        unsafe = [
            v.value for v in node.values
            if isinstance(v, ast.FormattedValue) and not _is_safe(v.value)
        ]  # fmt: skip
        if not unsafe:
            continue
        start = func_start.get(node.lineno, node.lineno - LOOKBACK)
        window = lines[max(0, start - 1) : (node.end_lineno or node.lineno)]
        if any(JUSTIFICATION in line for line in window):
            continue
        found.append((node.lineno, ", ".join(ast.unparse(v) for v in unsafe)))
    return found


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_the_audit_sees_the_tree(tmp_path: Path) -> None:
    # Guards the guard: the scan must find the package sources and recognise SQL f-strings.
    assert len(_sources()) > 30
    sample = tmp_path / "sample.py"
    body = '    return f"SELECT * FROM {t}"\n'
    sample.write_text("def f(t):\n" + body)
    assert _sql_fstrings(sample) == [(2, "t")]
    sample.write_text("def f(t):\n" + body.replace("{t}", "{ident(t)}"))
    assert _sql_fstrings(sample) == []
    sample.write_text("def f(t):\n    # sql: t is a schema table name\n" + body)
    assert _sql_fstrings(sample) == []
    sample.write_text("# sql: far away\n\n\n\n\ndef f(t):\n" + body)
    assert _sql_fstrings(sample) == [(7, "t")]
    sample.write_text('def f(t):\n    return f"{t} FROM x"\n')  # a fragment, or a message
    assert _sql_fstrings(sample) == []
    sample.write_text('def f(c, t):\n    c.execute(f"{t} FROM x")\n')  # handed to DuckDB
    assert _sql_fstrings(sample) == [(2, "t")]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_sql_fstrings_are_quoted_or_justified(path: Path) -> None:
    found = _sql_fstrings(path)
    assert not found, (
        f"{path.relative_to(ROOT)}: SQL built from unaudited text at "
        + "; ".join(f"line {line}: {{{expr}}}" for line, expr in found)
        + f". Quote it with storage/sqlnames.py (ident/literal), use a bind parameter, "
        f"or say why it is safe in a `{JUSTIFICATION}` comment above it."
    )
