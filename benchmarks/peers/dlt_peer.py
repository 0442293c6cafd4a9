"""dlt's rest_api source doing the sequential job: pages until total_pages, five fields,
JSONL files written by the filesystem destination (uncompressed).

    benchmarks/.venv-dlt/bin/python benchmarks/peers/dlt_peer.py BASE_URL OUT_DIR

Runs in its own virtualenv (dlt is never a dependency of the runner). Prints the number of
records loaded.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

# Before dlt is imported: no telemetry, plain (not gzipped) JSONL, quiet logs.
os.environ.setdefault("RUNTIME__DLT_TELEMETRY", "false")
os.environ.setdefault("DATA_WRITER__DISABLE_COMPRESSION", "true")
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
    base_url, out_dir = sys.argv[1], os.path.abspath(sys.argv[2])
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
                    "write_disposition": "append",
                }
            ],
        }
    )
    source.items.add_map(project)
    with tempfile.TemporaryDirectory(prefix="dlt-bench-") as work:
        pipeline = dlt.pipeline(
            pipeline_name="bench",
            pipelines_dir=work,
            destination=dlt.destinations.filesystem(bucket_url="file://" + out_dir),
            dataset_name="bench",
        )
        info = pipeline.run(source, loader_file_format="jsonl")
        info.raise_on_failed_jobs()
    count = 0
    for root, _dirs, files in os.walk(os.path.join(out_dir, "bench", "items")):
        for name in files:
            if name.endswith(".jsonl"):
                with open(os.path.join(root, name), "rb") as fh:
                    count += sum(1 for _ in fh)
    print(count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
