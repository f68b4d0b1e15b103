"""Builders of `.duckdb` files with the ORIGINAL benchmark database schema, for migration tests.

The DDL below is the original API's (see /work/shared/notes/original-schema.md),
with its PRIMARY KEY and FOREIGN KEY constraints, deliberately not benchsync's
`storage.schema`: migration must read what labs actually have. `quirks=True`
adds what files in the field show: assertion ids restarting per test result,
NULL run ids, and `metrics`/`metadata` stored as plain text (some of it not even
JSON). Rows are realistic: several models, hardware types, runs, batch results,
compatibility results and integration tests with assertions, plus the extra
table `web_platform_results` and the views some files carry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import duckdb

BASE_TIME = datetime(2024, 3, 1, 9, 0, 0)


def _ddl(quirks: bool) -> list[str]:
    json_type = "VARCHAR" if quirks else "JSON"  # old writers stored JSON as text
    assertion_pk = (
        "INTEGER NOT NULL" if quirks else "INTEGER PRIMARY KEY"
    )  # ids restarted per result
    return [
        f"""CREATE TABLE hardware_platforms (hardware_id INTEGER PRIMARY KEY,
            hardware_type VARCHAR NOT NULL, device_name VARCHAR, platform VARCHAR,
            platform_version VARCHAR, driver_version VARCHAR, memory_gb FLOAT,
            compute_units INTEGER, metadata {json_type},
            created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)""",
        f"""CREATE TABLE models (model_id INTEGER PRIMARY KEY, model_name VARCHAR NOT NULL,
            model_family VARCHAR, modality VARCHAR, source VARCHAR, version VARCHAR,
            parameters_million FLOAT, metadata {json_type}, created_at TIMESTAMP)""",
        f"""CREATE TABLE test_runs (run_id INTEGER PRIMARY KEY, test_name VARCHAR NOT NULL,
            test_type VARCHAR NOT NULL, started_at TIMESTAMP, completed_at TIMESTAMP,
            execution_time_seconds FLOAT, success BOOLEAN, git_commit VARCHAR, git_branch VARCHAR,
            command_line VARCHAR, metadata {json_type}, created_at TIMESTAMP)""",
        f"""CREATE TABLE performance_results (result_id INTEGER PRIMARY KEY, run_id INTEGER,
            model_id INTEGER NOT NULL, hardware_id INTEGER NOT NULL, test_case VARCHAR NOT NULL,
            batch_size INTEGER DEFAULT 1, precision VARCHAR, total_time_seconds FLOAT,
            average_latency_ms FLOAT, throughput_items_per_second FLOAT, memory_peak_mb FLOAT,
            iterations INTEGER, warmup_iterations INTEGER, metrics {json_type},
            created_at TIMESTAMP,
            FOREIGN KEY (run_id) REFERENCES test_runs(run_id),
            FOREIGN KEY (model_id) REFERENCES models(model_id),
            FOREIGN KEY (hardware_id) REFERENCES hardware_platforms(hardware_id))""",
        """CREATE TABLE performance_batch_results (batch_id INTEGER PRIMARY KEY,
            result_id INTEGER NOT NULL, batch_index INTEGER NOT NULL, batch_size INTEGER NOT NULL,
            latency_ms FLOAT, memory_usage_mb FLOAT, created_at TIMESTAMP,
            FOREIGN KEY (result_id) REFERENCES performance_results(result_id))""",
        f"""CREATE TABLE hardware_compatibility (compatibility_id INTEGER PRIMARY KEY,
            run_id INTEGER, model_id INTEGER NOT NULL, hardware_id INTEGER NOT NULL,
            is_compatible BOOLEAN NOT NULL, detection_success BOOLEAN NOT NULL,
            initialization_success BOOLEAN NOT NULL, error_message VARCHAR, error_type VARCHAR,
            suggested_fix VARCHAR, workaround_available BOOLEAN, compatibility_score FLOAT,
            metadata {json_type}, created_at TIMESTAMP,
            FOREIGN KEY (run_id) REFERENCES test_runs(run_id),
            FOREIGN KEY (model_id) REFERENCES models(model_id),
            FOREIGN KEY (hardware_id) REFERENCES hardware_platforms(hardware_id))""",
        f"""CREATE TABLE integration_test_results (test_result_id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL, test_module VARCHAR NOT NULL, test_class VARCHAR,
            test_name VARCHAR NOT NULL, status VARCHAR NOT NULL, execution_time_seconds FLOAT,
            hardware_id INTEGER, model_id INTEGER, error_message VARCHAR, error_traceback VARCHAR,
            metadata {json_type}, created_at TIMESTAMP,
            FOREIGN KEY (run_id) REFERENCES test_runs(run_id),
            FOREIGN KEY (hardware_id) REFERENCES hardware_platforms(hardware_id),
            FOREIGN KEY (model_id) REFERENCES models(model_id))""",
        f"""CREATE TABLE integration_test_assertions (assertion_id {assertion_pk},
            test_result_id INTEGER NOT NULL, assertion_name VARCHAR NOT NULL,
            passed BOOLEAN NOT NULL,
            expected_value VARCHAR, actual_value VARCHAR, message VARCHAR, created_at TIMESTAMP,
            FOREIGN KEY (test_result_id) REFERENCES integration_test_results(test_result_id))""",
    ]


EXTRA_DDL = [
    """CREATE TABLE web_platform_results (result_id INTEGER PRIMARY KEY, model_id INTEGER,
        hardware_id INTEGER, browser VARCHAR, browser_version VARCHAR, platform VARCHAR,
        shader_compilation_ms FLOAT, compute_shader_used BOOLEAN, created_at TIMESTAMP)""",
]
VIEWS = {
    "latest_performance_metrics": """CREATE VIEW latest_performance_metrics AS
        SELECT m.model_name, h.hardware_type, h.device_name, pr.batch_size, pr.precision,
               pr.throughput_items_per_second, pr.average_latency_ms, pr.created_at
        FROM performance_results pr JOIN models m ON pr.model_id = m.model_id
             JOIN hardware_platforms h ON pr.hardware_id = h.hardware_id
        QUALIFY row_number() OVER (PARTITION BY m.model_name, h.hardware_type, h.device_name,
                                   pr.batch_size, pr.precision ORDER BY pr.created_at DESC) = 1""",
    "cross_platform_performance": """CREATE VIEW cross_platform_performance AS
        SELECT m.model_name, w.browser, h.hardware_type, w.shader_compilation_ms
        FROM web_platform_results w JOIN models m ON w.model_id = m.model_id
             JOIN hardware_platforms h ON w.hardware_id = h.hardware_id""",
}

# (name, family, modality, params in millions)
MODELS = [
    ("bert-base-uncased", "bert", "text", 110.0),
    ("t5-small", "t5", "text", 60.5),
    ("vit-base-patch16-224", "vit", "vision", 86.6),
    ("whisper-tiny", "whisper", "audio", 39.0),
    ("llama-7b", "llama", "text", 6738.4),
]
# (type, device, platform, memory GB, compute units)
HARDWARE = [
    ("cpu", "Intel Xeon Gold 6338", "linux", 256.0, 64),
    ("cuda", "NVIDIA A100-SXM4-80GB", "linux", 80.0, 108),
    ("cuda", "NVIDIA GeForce RTX 4090", "linux", 24.0, 128),
    ("rocm", "AMD Instinct MI250", "linux", 128.0, 220),
    ("webgpu", None, "chrome", None, None),
]


@dataclass
class LegacyContents:
    """What a builder wrote: rows per table, and the names a test can query by."""

    path: Path
    rows: dict[str, int] = field(default_factory=dict)
    model_names: list[str] = field(default_factory=list)
    hardware_types: list[str] = field(default_factory=list)
    perf_by_model: dict[str, int] = field(default_factory=dict)  # model_name -> perf results

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def build_legacy_db(
    path: Path,
    *,
    seed: int = 0,
    models: int = 4,
    hardware: int = 4,
    quirks: bool = False,
    extras: bool = True,
    id_offset: int = 0,
    bulk_perf: int = 0,
) -> LegacyContents:
    """Write a legacy file with the original schema at `path` and return what it holds.

    `seed` varies the measurements; `models`/`hardware` pick the first N of
    `MODELS`/`HARDWARE` (rotated by seed, so two files share some models);
    `id_offset` starts ids elsewhere (files of different labs overlap in ids);
    `bulk_perf` adds that many more performance results generated in SQL.
    """
    conn = duckdb.connect(str(path))
    try:
        for stmt in _ddl(quirks) + (EXTRA_DDL if extras else []):
            conn.execute(stmt)
        out = LegacyContents(path=path)
        dumps = (lambda d: repr(d)) if quirks else json.dumps  # repr: Python dict text, not JSON
        pick_m = [MODELS[(seed + i) % len(MODELS)] for i in range(models)]
        pick_h = HARDWARE[:hardware]
        o = id_offset
        for i, (name, fam, mod, params) in enumerate(pick_m, 1):
            meta = json.dumps({"hub": "huggingface", "rank": i})
            conn.execute(
                "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    o + i,
                    name,
                    fam,
                    mod,
                    "huggingface",
                    "1.0",
                    params,
                    meta,
                    BASE_TIME + timedelta(minutes=i),
                ],
            )
        for i, (htype, dev, plat, mem, cu) in enumerate(pick_h, 1):
            conn.execute(
                "INSERT INTO hardware_platforms VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    o + i,
                    htype,
                    dev,
                    plat,
                    "6.1",
                    "535.104" if htype == "cuda" else None,
                    mem,
                    cu,
                    json.dumps({"rack": seed}),
                    BASE_TIME,
                ],
            )
        runs = 3
        for r in range(1, runs + 1):
            start = BASE_TIME + timedelta(days=r, hours=seed)
            conn.execute(
                "INSERT INTO test_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    o + r,
                    f"nightly-{seed}-{r}",
                    "performance" if r < 3 else "integration",
                    start,
                    start + timedelta(minutes=42),
                    2520.5,
                    r != 2,
                    f"abc{seed}{r:04d}",
                    "main",
                    "python run_benchmarks.py --all",
                    json.dumps({"ci": True, "seed": seed}),
                    start,
                ],
            )
        rid = 0
        bid = 0
        for mi, (name, *_rest) in enumerate(pick_m, 1):
            out.perf_by_model[name] = 0
            for hi in range(1, len(pick_h) + 1):
                for batch in (1, 8, 32):
                    rid += 1
                    run_id = None if (quirks and rid % 4 == 0) else o + 1 + (rid % 2)
                    thr = 100.0 * mi * batch / hi + seed + 0.1  # not exact in FLOAT
                    lat = 1000.0 * batch / thr
                    metrics = dumps({"p50_ms": round(lat, 3), "gpu_util": 0.7})
                    conn.execute(
                        "INSERT INTO performance_results VALUES "
                        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            o + rid,
                            run_id,
                            o + mi,
                            o + hi,
                            "inference",
                            batch,
                            "fp16" if hi > 1 else "fp32",
                            12.5 + rid,
                            lat,
                            thr,
                            512.0 * batch + mi,
                            100,
                            10,
                            metrics,
                            BASE_TIME + timedelta(hours=rid),
                        ],
                    )
                    out.perf_by_model[name] += 1
                    if batch == 8:
                        for bi in range(3):
                            bid += 1
                            conn.execute(
                                "INSERT INTO performance_batch_results VALUES "
                                "(?, ?, ?, ?, ?, ?, ?)",
                                [
                                    o + bid,
                                    o + rid,
                                    bi,
                                    batch,
                                    lat + bi * 0.25,
                                    512.0 + bi,
                                    BASE_TIME + timedelta(hours=rid),
                                ],
                            )
        cid = 0
        for mi in range(1, len(pick_m) + 1):
            for hi in range(1, len(pick_h) + 1):
                cid += 1
                ok = (mi + hi + seed) % 5 != 0
                conn.execute(
                    "INSERT INTO hardware_compatibility VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        o + cid,
                        None if quirks and cid % 3 == 0 else o + 1,
                        o + mi,
                        o + hi,
                        ok,
                        True,
                        ok,
                        None if ok else "CUDA out of memory",
                        None if ok else "OOM",
                        None if ok else "reduce batch size",
                        not ok,
                        1.0 if ok else 0.35,
                        dumps({"checked_by": "probe"}),
                        BASE_TIME + timedelta(minutes=cid),
                    ],
                )
        aid = 0
        statuses = ["pass", "fail", "pass", "error", "skip"]
        for ti, status in enumerate(statuses, 1):
            tid = ti
            conn.execute(
                "INSERT INTO integration_test_results VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    o + tid,
                    o + 3,
                    "tests.test_pipeline",
                    "TestPipeline",
                    f"test_case_{ti}",
                    status,
                    1.5 * ti,
                    o + 1 + ti % len(pick_h),
                    None if ti == 5 else o + 1 + ti % len(pick_m),
                    None if status == "pass" else f"{status}: boom",
                    None if status in ("pass", "skip") else "Traceback ...",
                    json.dumps({"retries": ti % 2}),
                    BASE_TIME + timedelta(days=3, minutes=ti),
                ],
            )
            if quirks:
                aid = 0  # the original restarted assertion ids for every result
            for ai in range(1, 3 + ti % 2):
                aid += 1
                conn.execute(
                    "INSERT INTO integration_test_assertions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        aid if quirks else o + aid,
                        o + tid,
                        f"check_{ai}",
                        status == "pass" or ai == 1,
                        str(ai),
                        str(ai if status == "pass" else 0),
                        None,
                        BASE_TIME + timedelta(days=3, minutes=ti),
                    ],
                )
        if bulk_perf:
            conn.execute(f"""
                INSERT INTO performance_results
                SELECT {o + rid} + i, {o + 1} + i % {runs}, {o + 1} + i % {len(pick_m)},
                       {o + 1} + (i // 7) % {len(pick_h)}, 'bulk-' || (i % 13), 1 << (i % 6),
                       CASE WHEN i % 2 = 0 THEN 'fp16' ELSE 'fp32' END, (i % 1000) / 7.0,
                       1 + (i % 997) / 3.0, 10 + (i % 991) * 1.5, 256 + i % 4096, 100, 10,
                       '{{"i": ' || i || '}}', TIMESTAMP '2024-01-01' + INTERVAL (i) SECOND
                FROM range(1, {bulk_perf + 1}) t(i)""")
            per_model = conn.execute(
                "SELECT m.model_name, count(*) FROM performance_results p JOIN models m "
                "USING (model_id) GROUP BY 1"
            ).fetchall()
            out.perf_by_model = {str(n): int(c) for n, c in per_model}
        if extras:
            for wi, (mi, hi) in enumerate([(1, 1), (2, len(pick_h)), (1, len(pick_h))], 1):
                conn.execute(
                    "INSERT INTO web_platform_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        wi,
                        o + mi,
                        o + hi,
                        "chrome",
                        "124",
                        "linux",
                        35.5 * wi,
                        wi % 2 == 0,
                        BASE_TIME,
                    ],
                )
            for sql in VIEWS.values():
                conn.execute(sql)
        tables = [
            r[0]
            for r in conn.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()
        ]
        out.rows = {
            t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchall()[0][0]) for t in tables
        }
        out.model_names = [m[0] for m in pick_m]
        out.hardware_types = sorted({h[0] for h in pick_h})
        return out
    finally:
        conn.close()
