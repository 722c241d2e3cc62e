"""The CLI as a user meets it: clear one-line errors and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import write_job


def batchinfer(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batch.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def test_bad_spec_exits_2_naming_the_path(tmp_path: Path) -> None:
    job = write_job(
        tmp_path / "job.yaml",
        """\
        name: x
        input: {path: in/}
        output: {path: out/}
        model: {path: m, taks: generate}
        prompt: {template: "{{ body }}"}
        """,
    )
    res = batchinfer("submit", str(job))
    assert res.returncode == 2
    assert "model.taks: unknown key; did you mean 'task'?" in res.stderr
    assert "job.yaml:4" in res.stderr


def test_validate_prints_the_full_spec(tmp_path: Path) -> None:
    res = batchinfer("validate", "jobs/enrich.yaml", "--set", "resources.replicas=2")
    assert res.returncode == 0, res.stderr
    assert "replicas: 2" in res.stdout
    assert "is valid" in res.stdout


def test_missing_input_is_one_line_exit_2(tmp_path: Path) -> None:
    job = write_job(
        tmp_path / "job.yaml",
        f"""\
        name: x
        input: {{path: "{tmp_path}/nothing/"}}
        output: {{path: "{tmp_path}/out/"}}
        model: {{path: m, engine: fake}}
        prompt: {{template: "{{{{ body }}}}"}}
        """,
    )
    res = batchinfer("submit", str(job))
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: input.path:")
    assert "does not exist; check the path" in res.stderr and "Traceback" not in res.stderr


def test_submit_logs_json_lines_when_not_a_terminal(reviews: Path, tmp_path: Path) -> None:
    job = write_job(
        tmp_path / "job.yaml",
        f"""\
        name: cli-fake
        input: {{path: "{reviews}", id_column: review_id}}
        output: {{path: "{tmp_path}/out/"}}
        model: {{path: m, engine: fake, fake_options: {{max_model_len: 400}}}}
        prompt: {{template: "{{{{ body }}}}"}}
        resources: {{rows_per_chunk: 48}}
        """,
    )
    res = batchinfer("submit", str(job))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    import json

    events = [json.loads(ln)["event"] for ln in lines[:-1]]
    assert events[0] == "planned" and events[-1] == "finished"
    # 36 rows share an equal prompt's answer (dedup is on at temperature 0): the line says so
    expected = "cli-fake: 92 rows (36 from the cache or an equal prompt), 4 failed"
    assert lines[-1].startswith(expected)
