"""The deployment examples a user copies (deploy/, the Dockerfile): every manifest parses,
every command in them is a valid `runner` command line for the real CLI, naming a flow that
exists and validates, the shards agree with the Job's size, exit codes map to the retry
policies the runner's exit codes call for, and the Airflow DAG builds one task per shard
and retries only on 69 and 75. Without Airflow installed, the DAG file runs against a
stand-in of the few Airflow names it uses; `make test-airflow` imports it with Airflow."""

from __future__ import annotations

import os
import re
import runpy
import shlex
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pytest
import yaml

from runner.cli import build_parser
from runner.run import load_flow
from runner.shard import parse_shard
from tests.conftest import Serve, read_jsonl, run_cli
from tests.destinations import PostgresDatabase

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DAG_FILE = DEPLOY / "airflow" / "runner_shards_dag.py"
FAIL_AT_ONCE = {1, 2}
RETRIED = {69, 75}


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        with path.open(encoding="utf-8") as handle:
            found += [(path, doc) for doc in yaml.safe_load_all(handle) if doc is not None]
    return found


def jobs() -> Iterator[tuple[Path, str, dict[str, Any]]]:
    """(file, kind, Job spec) for every Job and every CronJob's jobTemplate."""
    for path, doc in manifests():
        if doc["kind"] == "Job":
            yield path, "Job", doc["spec"]
        elif doc["kind"] == "CronJob":
            yield path, "CronJob", doc["spec"]["jobTemplate"]["spec"]


def repo_flow(path_in_image: str) -> Path:
    """/flows/x.yaml in the image (the Dockerfile copies flows/ there) is flows/x.yaml here."""
    assert path_in_image.startswith("/flows/"), path_in_image
    return ROOT / "flows" / path_in_image.removeprefix("/flows/")


def check_run_command(args: list[str]) -> Any:
    """Parses `args` with the real CLI (argparse exits 2 on a bad command line) and checks
    the flow it names; returns the parsed arguments."""
    parsed = build_parser().parse_args(args)
    assert parsed.command == "run"
    flow = Path(parsed.flow)
    if not flow.is_file():
        flow = repo_flow(parsed.flow)
    assert flow.is_file(), f"{parsed.flow}: no such flow"
    if parsed.shard is not None:
        assert load_flow(str(flow)).sharded, f"{flow}: --shard on a flow with no shard: true"
    return parsed


def test_every_manifest_parses_and_names_its_kind() -> None:
    found = manifests()
    assert {path.name for path, _ in found} == {"cronjob.yaml", "indexed-job.yaml"}
    for path, doc in found:
        assert doc.get("apiVersion") and doc.get("kind"), path
    kinds = sorted(doc["kind"] for _, doc in found)
    assert kinds == ["ConfigMap", "CronJob", "Job"]


def test_every_flow_the_examples_run_validates() -> None:
    flows: set[Path] = set()
    for _, _, spec in jobs():
        for container in spec["template"]["spec"]["containers"]:
            flows.add(repo_flow(container["args"][1]))
    flows.add(repo_flow("/flows/" + Path(dag_module()["FLOW"]).name))
    assert flows
    result = run_cli("validate", "--strict", *map(str, sorted(flows)))
    assert result.code == 0, result.stdout + result.stderr


def test_job_commands_are_runner_command_lines_and_the_shards_cover_the_job() -> None:
    seen_kinds = set()
    for path, kind, spec in jobs():
        seen_kinds.add(kind)
        [container] = spec["template"]["spec"]["containers"]
        args = container["args"]
        indexed = spec.get("completionMode") == "Indexed"
        if not indexed:
            parsed = check_run_command(args)
            assert parsed.shard is None, path
            continue
        count = spec["completions"]
        assert spec["parallelism"] == count, f"{path}: every shard at once"
        assert any("$(JOB_COMPLETION_INDEX)" in arg for arg in args)
        shards = []
        for index in range(count):
            filled = [arg.replace("$(JOB_COMPLETION_INDEX)", str(index)) for arg in args]
            parsed = check_run_command(filled)
            shards.append(parse_shard(parsed.shard))
        assert [(s.index, s.count) for s in shards] == [(i, count) for i in range(count)]
    assert seen_kinds == {"Job", "CronJob"}


def test_a_bad_command_line_fails_the_check() -> None:
    # The check above is the real parser's: a wrong flag or a missing flow is caught.
    with pytest.raises(SystemExit):
        check_run_command(["run", "/flows/contacts.yaml", "--shrad", "0/2"])
    with pytest.raises(AssertionError, match="no such flow"):
        check_run_command(["run", "/flows/nowhere.yaml"])
    with pytest.raises(AssertionError, match="no shard: true"):
        check_run_command(["run", "/flows/contacts.yaml", "--shard", "0/2"])


def exit_codes(rule: dict[str, Any]) -> set[int]:
    return set(rule.get("onExitCodes", {}).get("values", ()))


def test_exit_codes_map_to_the_retry_policies() -> None:
    for path, _, spec in jobs():
        pod = spec["template"]["spec"]
        [container] = pod["containers"]
        assert pod["restartPolicy"] == "Never", path  # podFailurePolicy requires it
        rules = spec["podFailurePolicy"]["rules"]
        indexed = spec.get("completionMode") == "Indexed"
        fail = [r for r in rules if r["action"] == ("FailIndex" if indexed else "FailJob")]
        count = [r for r in rules if r["action"] == "Count"]
        assert {c for r in fail for c in exit_codes(r)} == FAIL_AT_ONCE, path
        assert {c for r in count for c in exit_codes(r)} == RETRIED, path
        for rule in fail + count:
            assert rule["onExitCodes"]["operator"] == "In"
            assert rule["onExitCodes"]["containerName"] == container["name"]
        ignored = [r for r in rules if r["action"] == "Ignore"]
        assert [c["type"] for r in ignored for c in r["onPodConditions"]] == ["DisruptionTarget"]
        if indexed:
            assert spec["backoffLimitPerIndex"] >= 1  # a shard is retried on its own
        else:
            assert spec["backoffLimit"] >= 1
    [cron] = [doc for _, doc in manifests() if doc["kind"] == "CronJob"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_pods_run_as_a_user_and_read_secrets_from_files() -> None:
    [config] = [doc for _, doc in manifests() if doc["kind"] == "ConfigMap"]
    sink = urlsplit(config["data"]["RUNNER_SINK"])
    assert sink.scheme == "postgresql" and sink.password is None  # the password is a file
    for path, _, spec in jobs():
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, path
        assert pod["securityContext"]["runAsUser"] != 0
        [container] = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        secret_volumes = [v["name"] for v in pod["volumes"] if "secret" in v]
        assert [mounts[name] for name in secret_volumes] == [env["RUNNER_SECRETS_DIR"]]
        assert all("secretKeyRef" not in str(e) for e in container.get("env", []))
        refs = [src["configMapRef"]["name"] for src in container["envFrom"]]
        assert refs == [config["metadata"]["name"]]


def test_the_indexed_jobs_pods_together_load_the_whole_run(
    serve: Serve, postgres_db: PostgresDatabase, tmp_path: Path
) -> None:
    """The Indexed Job's pods, as processes: each its container's args with its completion
    index, its ConfigMap's environment (the URLs pointed at a local demo API and database)
    and a secrets folder; together they load what one unsharded run writes."""
    from runner.demo_api import create_app

    demo = serve(create_app())
    [(_, _, spec)] = [job for job in jobs() if job[1] == "Job"]
    [container] = spec["template"]["spec"]["containers"]
    [config] = [doc for _, doc in manifests() if doc["kind"] == "ConfigMap"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "DEMO_TOKEN").write_text("demo-token\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env |= {**config["data"], "DEMO_API_URL": demo.url, "RUNNER_SINK": postgres_db.url}
    env |= {e["name"]: str(secrets) for e in container["env"] if e["name"] == "RUNNER_SECRETS_DIR"}
    flow = str(repo_flow(container["args"][1]))
    pods = []
    for index in range(spec["completions"]):
        args = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)) for a in container["args"]]
        args[1] = flow
        pods.append(
            subprocess.Popen(
                [sys.executable, "-m", "runner.cli", *args],
                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True,
            )
        )  # fmt: skip
    for index, pod in enumerate(pods):
        _, err = pod.communicate(timeout=120)
        assert pod.returncode == 0, f"pod {index}: {err}"
        assert f'"shard": "{index}/{spec["completions"]}"' in err  # JSON logs name it
    whole = run_cli(
        "run", flow, "--output-dir", str(tmp_path / "whole"), env={**env, "RUNNER_SINK": ""}
    )
    assert whole.code == 0, whole.stderr
    expected = sorted(r["id"] for r in read_jsonl(tmp_path / "whole" / "companies.jsonl"))
    assert [r["id"] for r in postgres_db.rows("companies")] == expected
    contacts = read_jsonl(tmp_path / "whole" / "contacts.jsonl")
    assert len(postgres_db.rows("contacts")) == len(contacts) > 0


# -- the Dockerfile --------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments dropped."""
    lines = (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def test_the_dockerfile_builds_a_slim_non_root_image_with_the_flows() -> None:
    steps = dockerfile()
    assert steps[0] == ("FROM", "python:3.12-slim")
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and not users[-1].startswith("0")
    assert ("ENTRYPOINT", '["runner"]') in steps
    copies = [shlex.split(arg) for op, arg in steps if op == "COPY"]
    assert ["flows", "/flows"] in copies
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for *sources, _ in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source not in ignored, f"COPY {source}: excluded by .dockerignore"
    copied = {source for *sources, _ in copies for source in sources}
    # What pip needs to build the package from the copied files alone.
    assert {"pyproject.toml", "runner", "schemas", "README.md"} <= copied
    runs = [arg for op, arg in steps if op == "RUN"]
    assert any("pip install '.[postgres]'" in run for run in runs)
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r"^postgres = \[", pyproject, re.M)  # the extra exists
    assert "runner validate /flows" in runs
    env = " ".join(arg for op, arg in steps if op == "ENV")
    assert "RUNNER_SECRETS_DIR=/run/secrets/runner" in env


# -- the Airflow DAG -------------------------------------------------------------------------


def _stand_in_airflow() -> dict[str, types.ModuleType]:
    """The few Airflow names the DAG file uses, recording what it builds."""

    class AirflowException(Exception):
        pass

    class AirflowFailException(AirflowException):
        pass

    class AirflowSkipException(AirflowException):
        pass

    class DAG:
        built: ClassVar[list[DAG]] = []

        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs
            self.mapped: list[dict[str, Any]] = []
            DAG.built.append(self)

        def __enter__(self) -> DAG:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    class Partial:
        def __init__(self, operator: type, kwargs: dict[str, Any]) -> None:
            self.operator, self.kwargs = operator, kwargs

        def expand(self, **mapped: list[Any]) -> None:
            DAG.built[-1].mapped.append({"operator": self.operator, **self.kwargs, **mapped})

    class BashOperator:
        exit_code = 0  # what the stand-in's command "returns"

        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs

        @classmethod
        def partial(cls, **kwargs: Any) -> Partial:
            return Partial(cls, kwargs)

        def execute(self, context: Any) -> Any:
            # Airflow's own message for a failed command.
            if self.exit_code:
                raise AirflowException(
                    "Bash command failed. The command returned a non-zero exit code "
                    f"{self.exit_code}."
                )
            return "done"

    airflow = types.ModuleType("airflow")
    airflow.DAG = DAG  # type: ignore[attr-defined]
    exceptions = types.ModuleType("airflow.exceptions")
    for cls in (AirflowException, AirflowFailException, AirflowSkipException):
        setattr(exceptions, cls.__name__, cls)
    operators = types.ModuleType("airflow.operators")
    bash = types.ModuleType("airflow.operators.bash")
    bash.BashOperator = BashOperator  # type: ignore[attr-defined]
    return {
        "airflow": airflow,
        "airflow.exceptions": exceptions,
        "airflow.operators": operators,
        "airflow.operators.bash": bash,
    }


def dag_module() -> dict[str, Any]:
    """The DAG file run against the stand-in (or against Airflow, when it is installed)."""
    stand_in = _stand_in_airflow()
    saved = {name: sys.modules.get(name) for name in stand_in}
    try:
        sys.modules.update(stand_in)
        namespace = runpy.run_path(str(DAG_FILE))
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    namespace["_airflow"] = stand_in
    return namespace


def test_the_dag_maps_one_task_per_shard_and_each_is_a_runner_command_line() -> None:
    module = dag_module()
    dag = module["dag"]
    [mapped] = dag.mapped
    commands = mapped["bash_command"]
    assert len(commands) == module["SHARDS"] >= 2
    shards = []
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "runner"
        flow = repo_flow("/flows/" + Path(argv[2]).name)
        parsed = check_run_command([argv[1], str(flow), *argv[3:]])
        shards.append(parse_shard(parsed.shard))
    count = module["SHARDS"]
    assert [(s.index, s.count) for s in shards] == [(i, count) for i in range(count)]
    assert mapped["retries"] >= 1
    assert mapped["env"]["RUNNER_SECRETS_DIR"] and mapped["append_env"] is True
    assert dag.kwargs["max_active_runs"] == 1


@pytest.mark.parametrize(
    ("code", "outcome"),
    [(0, "done"), (1, "AirflowFailException"), (2, "AirflowFailException"),
     (69, "AirflowException"), (75, "AirflowException"), (137, "AirflowException")],
)  # fmt: skip
def test_the_dag_retries_only_on_69_and_75(code: int, outcome: str) -> None:
    module = dag_module()
    operator = module["RunnerShardOperator"](task_id="t", bash_command="runner run x")
    operator.exit_code = code
    try:
        result = operator.execute({})
    except Exception as exc:  # the exception's class is the finding
        result = type(exc).__name__
    # AirflowFailException fails the task without retries; AirflowException is retried.
    assert result == outcome


def test_the_dag_imports_with_airflow() -> None:
    pytest.importorskip("airflow")
    from airflow.models import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE), include_examples=False)
    assert bag.import_errors == {}
    dag = bag.dags["runner_companies_sharded"]
    [task] = dag.tasks
    assert task.task_id == "shard"
    commands = task.expand_input.value["bash_command"]
    assert len(commands) == 4
    for i, command in enumerate(commands):
        argv = shlex.split(command)
        flow = repo_flow("/flows/" + Path(argv[2]).name)
        parsed = check_run_command([argv[1], str(flow), *argv[3:]])
        assert parsed.shard == f"{i}/4"


@pytest.mark.parametrize(("code", "retried"), [(1, False), (2, False), (69, True), (75, True)])
def test_with_airflow_the_operator_retries_only_on_69_and_75(code: int, retried: bool) -> None:
    pytest.importorskip("airflow")
    from airflow.exceptions import AirflowException, AirflowFailException

    module = runpy.run_path(str(DAG_FILE))
    operator = module["RunnerShardOperator"](task_id="t", bash_command=f"exit {code}")
    with pytest.raises(AirflowException) as raised:
        operator.execute({})
    assert isinstance(raised.value, AirflowFailException) is not retried
