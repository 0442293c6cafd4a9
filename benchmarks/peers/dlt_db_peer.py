"""dlt's rest_api source doing the sequential job into a database: duckdb or PostgreSQL,
merge on `id` (as the runner's default with a primary key).

    benchmarks/.venv-dlt-db/bin/python benchmarks/peers/dlt_db_peer.py BASE_URL duckdb PATH
    benchmarks/.venv-dlt-db/bin/python benchmarks/peers/dlt_db_peer.py BASE_URL postgres URL

Runs in its own virtualenv (dlt is never a dependency of the runner). Prints the number of
rows in the table afterwards.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

os.environ.setdefault("RUNTIME__DLT_TELEMETRY", "false")
os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")

import dlt
from dlt.sources.rest_api import rest_api_source


def project(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": rec["id"],
        "email": rec["email"],
        "amount": rec["amount"],
        "updated_at": rec["updated_at"],
        "country": rec["address"]["country"],
    }


def main() -> int:
    base_url, kind, target = sys.argv[1], sys.argv[2], sys.argv[3]
    source = rest_api_source(
        {
            "client": {
                "base_url": base_url.rstrip("/") + "/",
                "paginator": {
                    "type": "page_number",
                    "base_page": 1,
                    "page_param": "page",
                    "total_path": "total_pages",
                },
            },
            "resources": [
                {
                    "name": "items",
                    "endpoint": {
                        "path": "items",
                        "params": {"per_page": 100},
                        "data_selector": "data",
                    },
                    "primary_key": "id",
                    "write_disposition": "merge",
                }
            ],
        }
    )
    source.items.add_map(project)
    if kind == "duckdb":
        destination: Any = dlt.destinations.duckdb(target)
    else:
        # dlt insists on a host in the URL; libpq lets `?host=` (the embedded server's
        # socket folder) override it.
        credentials = target.replace("@/", "@localhost/", 1)
        destination = dlt.destinations.postgres(credentials=credentials)
    with tempfile.TemporaryDirectory(prefix="dlt-bench-") as work:
        pipeline = dlt.pipeline(
            pipeline_name="bench",
            pipelines_dir=work,
            destination=destination,
            dataset_name="bench",
        )
        info = pipeline.run(source)
        info.raise_on_failed_jobs()
        with pipeline.sql_client() as client:
            rows = client.execute_sql("SELECT count(*) FROM items")
    print(rows[0][0] if rows else 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
