"""One flow in N shards under Airflow: dynamic task mapping starts one task per shard, each an
ordinary `runner run --shard I/N`, all committing into one PostgreSQL destination.

Copy this file into the DAGs folder of an Airflow (2.4 or later) whose workers have `runner`
installed (`pip install 'runner-flows[postgres]'`) and the flows at FLOW. The workers'
environment gives RUNNER_SINK (the destination, without its password) and the secrets
folder holds the flow's secrets and PGPASSWORD, one file each. On Kubernetes, see
deploy/airflow/README.md for the same DAG with KubernetesPodOperator.

A shard is retried only when `runner` exits 69 (a service stayed unavailable) or 75
(another run holds the lock), which pass with time, or was killed by a signal (exit 128 + n:
out of memory, a lost worker), which a rerun recovers from since a killed run commits
nothing. Exit 1 (the run failed) and 2 (the flow, inputs or command line are wrong) fail
the same way again, so the task fails at once, without using its retries. Each shard
commits on its own: a failed shard reruns alone ("Clear" on its mapped task), and the
others' work stands.
"""

from __future__ import annotations

import re
import shlex
from datetime import datetime, timedelta
from typing import Any

from airflow import DAG
from airflow.exceptions import AirflowException, AirflowFailException, AirflowSkipException

try:  # Airflow 3 moved the operator to the standard provider
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:
    from airflow.operators.bash import BashOperator

SHARDS = 4
FLOW = "/opt/airflow/flows/companies_sharded.yaml"
SECRETS_DIR = "/opt/airflow/secrets/runner"
RETRIED_EXIT_CODES = frozenset({69, 75})

# BashOperator's message for a failed command ends "... non-zero exit code 2."
_EXIT_CODE = re.compile(r"exit code (\d+)")


def shard_command(index: int, count: int = SHARDS) -> str:
    """The command of shard `index` of `count`."""
    args = ["runner", "run", FLOW, "--shard", f"{index}/{count}", "--log-format", "json"]
    return shlex.join(args)


class RunnerShardOperator(BashOperator):  # type: ignore[misc]
    """BashOperator whose failure is retried only on the runner's retryable exit codes."""

    def execute(self, context: Any) -> Any:
        try:
            return super().execute(context)
        except (AirflowSkipException, AirflowFailException):
            raise
        except AirflowException as exc:
            found = _EXIT_CODE.search(str(exc))
            code = int(found.group(1)) if found else None
            if code is not None and code < 128 and code not in RETRIED_EXIT_CODES:
                raise AirflowFailException(
                    f"runner exited {code}: a retry would fail the same way, so none is made "
                    "(exit 69, 75 and deaths by a signal are retried)"
                ) from exc
            raise


with DAG(
    dag_id="runner_companies_sharded",
    description=f"flows/companies_sharded.yaml in {SHARDS} shards",
    schedule="17 * * * *",
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,  # two runs of one flow would meet at the destination's lock
    tags=["runner"],
) as dag:
    RunnerShardOperator.partial(
        task_id="shard",
        env={"RUNNER_SECRETS_DIR": SECRETS_DIR},
        append_env=True,  # and the worker's own environment (RUNNER_SINK, PATH)
        retries=5,
        retry_delay=timedelta(minutes=1),
        retry_exponential_backoff=True,
        max_retry_delay=timedelta(minutes=15),
        execution_timeout=timedelta(hours=2),
    ).expand(bash_command=[shard_command(i) for i in range(SHARDS)])
