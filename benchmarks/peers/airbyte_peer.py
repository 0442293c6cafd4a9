"""Airbyte's declarative (low-code) framework doing the sequential job, as a connector runs:
`read` with a config and a configured catalog, Airbyte protocol messages on stdout.

    benchmarks/.venv-airbyte/bin/python benchmarks/peers/airbyte_peer.py BASE_URL > OUT_FILE

Runs in its own virtualenv (airbyte-cdk is never a dependency of the runner). The messages go
to stdout, as a destination would receive them; the RECORD lines are the records.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST = os.path.join(HERE, "airbyte", "manifest.yaml")


def main() -> int:
    base_url = sys.argv[1]
    from airbyte_cdk.entrypoint import launch
    from airbyte_cdk.models import ConfiguredAirbyteCatalogSerializer
    from airbyte_cdk.sources.declarative.yaml_declarative_source import YamlDeclarativeSource

    catalog = {
        "streams": [
            {
                "stream": {
                    "name": "items",
                    "json_schema": {},
                    "supported_sync_modes": ["full_refresh"],
                },
                "sync_mode": "full_refresh",
                "destination_sync_mode": "overwrite",
            }
        ]
    }
    with tempfile.TemporaryDirectory(prefix="airbyte-bench-") as work:
        config_path = os.path.join(work, "config.json")
        catalog_path = os.path.join(work, "catalog.json")
        with open(config_path, "w") as fh:
            json.dump({"base_url": base_url}, fh)
        with open(catalog_path, "w") as fh:
            json.dump(catalog, fh)
        # Recent CDKs build the streams when the source is made: it needs the config then.
        source = YamlDeclarativeSource(
            path_to_yaml=MANIFEST,
            config={"base_url": base_url},
            catalog=ConfiguredAirbyteCatalogSerializer.load(catalog),
        )
        launch(source, ["read", "--config", config_path, "--catalog", catalog_path])
    return 0


if __name__ == "__main__":
    sys.exit(main())
