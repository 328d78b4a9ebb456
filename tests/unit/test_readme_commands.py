"""The documented ``stepops`` commands (docs/cli.md, linked from the README) run as written on a demo-like
home, and the CLI's promises: no ``~/airflow`` created, configuration-only ``list``/``describe``, credentials named as used."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    return {**env, "AIRFLOW_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{env['PATH']}", **extra}


def _stepops(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "stepops"), *args], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def _fake_db(home: Path, connections: dict[str, tuple[str, dict]]) -> None:
    """The columns of Airflow's ``connection`` table that the CLI reads (no Airflow needed)."""
    home.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(home / "airflow.db") as db:
        db.execute("CREATE TABLE connection (conn_id TEXT, conn_type TEXT, extra TEXT, is_extra_encrypted BOOLEAN)")
        db.executemany("INSERT INTO connection VALUES (?, ?, ?, 0)",
                       [(k, t, json.dumps(e)) for k, (t, e) in connections.items()])


def test_no_airflow_home_is_created(tmp_path: Path) -> None:
    env = {**_env(tmp_path), "HOME": str(tmp_path)}
    del env["AIRFLOW_HOME"]
    proc = _stepops("list", env=env)
    assert proc.returncode == 2
    assert "AIRFLOW_HOME is not set and ~/airflow does not exist" in proc.stderr
    assert "export AIRFLOW_HOME=$PWD/.airflow/demo" in proc.stderr
    assert not (tmp_path / "airflow").exists()


SAGEMAKER = ("stepops_sagemaker", {"role": "arn:aws:iam::123456789012:role/R", "region_name": "us-east-1",
                                   "image": "i", "artifact_store": "s3://b/p"})


def test_list_and_describe_read_configuration_only(tmp_path: Path) -> None:
    """All six flavors listed without importing Airflow or a cloud SDK (so nothing reaches a network), and
    a missing aws_default is named with what is used instead."""
    conns = json.loads((REPO / "dags_examples" / "connections.json").read_text())
    _fake_db(tmp_path, {k: (v["conn_type"], {e: x for e, x in v["extra"].items() if "${" not in str(x)})
                        for k, v in conns.items()})
    code = ("import sys; from airflow_stepops import cli; cli.main(['list']); cli.main(['describe', "
            "'sagemaker_step_operator']); print(sorted({m.split('.')[0] for m in sys.modules} & {'airflow', "
            "'boto3', 'botocore', 'azure', 'kubernetes', 'modal', 'aiplatform'}))")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    for name in conns:
        assert re.search(rf"^{name}\s", proc.stdout, re.MULTILINE), proc.stdout
    assert "INVALID" not in proc.stdout
    assert "the default AWS credential chain (environment, ~/.aws, instance role): no connection 'aws_default'" in (
        proc.stdout)


def test_describe_names_an_existing_aws_connection(tmp_path: Path) -> None:
    _fake_db(tmp_path, {"sm": SAGEMAKER, "aws_default": ("aws", {})})
    proc = _stepops("describe", "sm", env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["credentials"] == "aws connection 'aws_default', region us-east-1"


def test_describe_unknown_name_lists_the_registered_ones(tmp_path: Path) -> None:
    _fake_db(tmp_path, {"sm": SAGEMAKER})
    proc = _stepops("describe", "nope", env=_env(tmp_path))
    assert proc.returncode == 2
    assert "no step operator 'nope'; registered step operators: sm (sagemaker)" in proc.stderr


def _cli_block() -> list[str]:
    text = (REPO / "docs" / "cli.md").read_text()
    section = text[text.index("# The `stepops` command"):]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block is not None
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in block.group(1).splitlines() if line.strip()]


@pytest.mark.slow
def test_cli_block_runs_as_written(tmp_path: Path) -> None:
    """The demo's set-up (scripts/demo.sh: its airflow.cfg, `airflow db migrate`, the example connection),
    then the block of docs/cli.md line by line in one shell, from the project root."""
    home = tmp_path / "demo"
    home.mkdir()
    (home / "airflow.cfg").write_text(f"[core]\ndags_folder = {REPO / 'dags_examples'}\nload_examples = False\n")
    env = _env(home)
    for cmd in (["airflow", "db", "migrate"], [sys.executable, "dags_examples/setup_connections.py", "local"]):
        subprocess.run([str(BIN / cmd[0]) if cmd[0] == "airflow" else cmd[0], *cmd[1:]], env=env, cwd=REPO,
                       check=True, capture_output=True, timeout=600)
    lines = _cli_block()
    assert lines[:2] == [". .venv/bin/activate", "export AIRFLOW_HOME=$PWD/.airflow/demo"]
    script = "\n".join(["set -e", f"export AIRFLOW_HOME={home}",  # the demo home, at a temporary path
                        *[f"echo '>>> {line}'; {line}" for line in lines[2:]]])
    env.pop("AIRFLOW_HOME")
    proc = subprocess.run(["bash", "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"^local_step_operator\s+local\s+none", out, re.MULTILINE)
    assert '"jobs_dir": "' + str(home / "stepops" / "local" / "jobs") in out
    assert '"task_id": "train_model"' in out and '"flavor": "local"' in out
    assert re.search(r"^local_step_operator .* ok \(", out, re.MULTILINE), out
    assert "RFC3986" not in proc.stderr + proc.stdout  # Airflow's warning about the '_' of stepops_local (docs/decisions/connections-and-cli.md)


def test_list_reads_the_database_airflow_reads_and_survives_bad_connections(tmp_path: Path) -> None:
    """The metadata DB named as Airflow names it ([core] fallback, environment variables expanded, %% for %),
    other connections that Airflow itself tolerates do not break the listing, and an unreadable DB is a
    message, not a traceback."""
    db_home = tmp_path / "db%home"
    _fake_db(db_home, {"local_step_operator": ("stepops_local", {})})
    (tmp_path / "airflow.cfg").write_text("[core]\nsql_alchemy_conn = sqlite:///${DB_HOME}%%home/airflow.db\n")
    env = _env(tmp_path, DB_HOME=str(tmp_path / "db"),
               AIRFLOW_CONN_OTHER_DB='{"conn_type": "postgres", "host": "h", "extra": "sslmode=require"}',
               AIRFLOW_CONN_ENV_LOCAL="stepops-local://?jobs_dir=%2Ftmp%2Fa%2520b")
    listed = _stepops("list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^local_step_operator\s+local", listed.stdout, re.MULTILINE), listed.stdout
    described = _stepops("describe", "env_local", env=env)
    assert described.returncode == 0 and '"jobs_dir": "/tmp/a%20b"' in described.stdout, described.stdout

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "airflow.db").write_text("")  # no connection table: never migrated
    broken = _stepops("list", env=_env(tmp_path / "broken"))
    assert broken.returncode == 2 and "Traceback" not in broken.stderr, broken.stderr
    assert "cannot read connections from the metadata database" in broken.stderr and "db migrate" in broken.stderr


def test_describe_answers_an_environment_connection_without_a_database(tmp_path: Path) -> None:
    env = _env(tmp_path, AIRFLOW_CONN_LOCAL_STEP_OPERATOR='{"conn_type": "stepops_local", "extra": {}}')
    described = _stepops("describe", "local_step_operator", env=env)
    assert described.returncode == 0 and '"flavor": "local"' in described.stdout, described.stderr
    missing = _stepops("describe", "elsewhere", env=env)
    assert missing.returncode == 2 and "no Airflow metadata database" in missing.stderr, missing.stderr
