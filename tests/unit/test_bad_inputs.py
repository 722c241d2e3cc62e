"""A catalog of bad inputs, each run through the real CLI: one line naming what to change.

Every case runs ``python -m batch.cli`` in a subprocess and checks what a user sees: the exit
code (2 invalid spec or input, 3 another run holds the output, 1 anything else), a last line
on stderr that starts with ``error:`` and names what to change, no traceback anywhere, and
every file that existed before the command unchanged. The README's table "Bad inputs and
what you see" is made from the same list (``test_readme_lists_the_catalog``).

Most cases fail before Ray starts; one finished output, made once (the only Ray start), is the
starting point of the cases about an existing output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from batch.demo import write_reviews
from tests import realparts

REPO = Path(__file__).resolve().parents[2]
FAKE_MODEL = "{path: fake, engine: fake, fake_options: {max_model_len: 400}}"


# Root may write anywhere; without these capabilities it is held to the permission bits.
UNPRIVILEGED = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def batchinfer(*args: str, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    prefix = UNPRIVILEGED if unprivileged and os.geteuid() == 0 else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "batch.cli", *args],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )  # fmt: skip


def job(
    where: Path,
    *,
    inp: str | None = None,
    out: str | None = None,
    model: str = FAKE_MODEL,
    extra: str = "",
    name: str = "job.yaml",
) -> Path:
    """A job file under ``where`` (reading ``where/reviews`` into ``where/out`` by default)."""
    inp = inp if inp is not None else str(where / "reviews")
    out = out if out is not None else str(where / "out")
    path = where / name
    body = f"""\
        name: bad-inputs
        input: {{path: "{inp}", id_column: review_id}}
        output: {{path: "{out}"}}
        model: {model}
        prompt: {{template: "Review of {{{{ product }}}}: {{{{ body }}}}"}}
        resources: {{rows_per_chunk: 48}}
        """
    path.write_text(textwrap.dedent(body) + textwrap.dedent(extra))
    return path


def reviews(where: Path) -> Path:
    folder = where / "reviews"
    write_reviews(folder, rows=12, files=1)
    return folder


# --------------------------------------------------------------------------- the catalog


@dataclass(frozen=True)
class Case:
    name: str
    area: str  # spec, data, storage, environment
    wrong: str  # what was wrong (the README's first column)
    gist: str  # what the message says (the README's second column)
    setup: Callable[[Path], list[str]]  # makes the files under a folder; returns the arguments
    code: int
    words: tuple[str, ...]  # each in the last line of stderr (case-insensitive)
    unprivileged: bool = False  # held to permission bits even when the tests run as root
    needs_output: bool = False  # starts from a finished output (made once, with Ray)


def _submit(extra: str = "", sets: tuple[str, ...] = (), **kw: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        reviews(tmp)
        argv = ["submit", str(job(tmp, extra=extra, **kw)), "--quiet"]
        return argv + [a for s in sets for a in ("--set", s)]

    return setup


def _missing_id_column(tmp: Path) -> list[str]:
    reviews(tmp)
    path = job(tmp)
    path.write_text(path.read_text().replace("id_column: review_id", "id_column: ident"))
    return ["submit", str(path), "--quiet"]


def _unknown_key(tmp: Path) -> list[str]:
    reviews(tmp)
    return ["submit", str(job(tmp, model="{path: fake, engine: fake, taks: generate}"))]


def _raw_job(text: str, *extra: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        path = tmp / "job.yaml"
        path.write_text(text)
        return ["submit", str(path), *extra]

    return setup


def _with_set(*sets: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        reviews(tmp)
        return ["validate", str(job(tmp)), *[a for s in sets for a in ("--set", s)]]

    return setup


def _bad_template(tmp: Path) -> list[str]:
    reviews(tmp)
    path = job(tmp)
    path.write_text(path.read_text().replace("{{ body }}", "{{ body "))
    return ["submit", str(path)]


def _input_with(files: dict[str, bytes]) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        folder = tmp / "in"
        folder.mkdir()
        for name, body in files.items():
            (folder / name).write_bytes(body)
        return ["submit", str(job(tmp, inp=str(folder))), "--quiet"]

    return setup


def _input_file(name: str, body: bytes, *sets: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        path = tmp / "in" / name
        path.parent.mkdir()
        path.write_bytes(body)
        argv = ["submit", str(job(tmp, inp=str(path))), "--quiet"]
        return argv + [a for s in sets for a in ("--set", s)]

    return setup


def _request(cid: str) -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return json.dumps(line).encode() + b"\n"


def _corrupt_next_to_good(tmp: Path) -> list[str]:
    folder = reviews(tmp)
    (folder / "zz-broken.parquet").write_bytes(b"PAR1 this is not a footer")
    return ["submit", str(job(tmp)), "--quiet"]


def _denied_output(tmp: Path) -> list[str]:
    reviews(tmp)
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)  # no one may write here
    return ["submit", str(job(tmp, out=str(locked / "out"))), "--quiet"]


def _output_under_file(tmp: Path) -> list[str]:
    reviews(tmp)
    (tmp / "report.txt").write_text("a file, not a folder\n")
    return ["submit", str(job(tmp, out=str(tmp / "report.txt" / "out"))), "--quiet"]


def _output_is_file(tmp: Path) -> list[str]:
    reviews(tmp)
    (tmp / "out").write_text("a file, not a folder\n")
    return ["submit", str(job(tmp)), "--quiet"]


def _unreachable_s3(tmp: Path) -> list[str]:
    reviews(tmp)
    options = (
        "{key: k, secret: s, skip_instance_cache: true, "
        "client_kwargs: {endpoint_url: 'http://127.0.0.1:9'}, "
        "config_kwargs: {connect_timeout: 1, retries: {max_attempts: 1}}}"
    )
    path = job(tmp, out="s3://bucket/out/")
    return ["submit", str(path), "--quiet", "--set", f"output.storage_options={options}"]


def _damaged_lease(tmp: Path) -> list[str]:
    reviews(tmp)
    lease = tmp / "out" / "_lease"
    lease.mkdir(parents=True)
    (lease / "00000001.json").write_text('{"holder": "host-1:123", "expires_at": 17')
    return ["submit", str(job(tmp)), "--quiet"]


def _changed_prompt(tmp: Path) -> list[str]:
    return ["submit", str(job(tmp)), "--quiet", "--set", "prompt.template={{ body }}!"]


def _reprice_unknown_gpu(tmp: Path) -> list[str]:
    sets = ["--set", "ledger.gpu=NOPE-9000", "--set", "resources.device=gpu"]
    return ["ledger", str(tmp / "out"), "--reprice", *sets]


def _status_bad_storage_options(tmp: Path) -> list[str]:
    return ["status", str(tmp / "out"), "--storage-options", "{unclosed: [1, 2"]


def _status_of_nothing(tmp: Path) -> list[str]:
    (tmp / "empty").mkdir()
    return ["status", str(tmp / "empty")]


def _ledger_before_a_run(tmp: Path) -> list[str]:
    reviews(tmp)
    return ["ledger", str(job(tmp))]


def _missing_model_dir(tmp: Path) -> list[str]:
    reviews(tmp)
    path = job(tmp, model=f'{{path: "{tmp}/models/nope", engine: vllm}}')
    return ["submit", str(path), "--quiet"]


def _plan_missing_model_dir(tmp: Path) -> list[str]:
    reviews(tmp)
    return ["plan", str(job(tmp, model="{path: ./models/qwen-not-here, engine: vllm}"))]


CASES: list[Case] = [
    # spec
    Case("unknown-key", "spec", "a misspelt key (`model.taks`)",
         "names file:line and the nearest valid key", _unknown_key, 2, ("did you mean", "task")),
    Case("wrong-type", "spec", "a value of the wrong type (`max_tokens: lots`)",
         "names the field and the type it wants",
         _submit(extra="sampling: {max_tokens: lots}\n"), 2, ("sampling.max_tokens", "integer")),
    Case("bad-template", "spec", "a prompt template that does not parse",
         "prompt.template and the Jinja error", _bad_template, 2, ("prompt.template",)),
    Case("bad-response-schema", "spec", "a typed answer with an unknown type (`stars: integr`)",
         "response.fields.stars and the types it takes",
         _submit(extra="response:\n  fields: {sentiment: [positive, negative], stars: integr}\n"),
         2, ("response.fields.stars", "integr", "did you mean 'int'")),
    Case("missing-job-file", "spec", "a job file that does not exist",
         "no such job file", lambda tmp: ["submit", str(tmp / "nope.yaml")], 2,
         ("no such job file",)),
    Case("not-yaml", "spec", "a job file that is not YAML",
         "the line and what YAML expected", _raw_job("name: [unclosed\ninput: {path: x}\n"), 2,
         ("job.yaml",)),
    Case("not-a-mapping", "spec", "a job file that is a list",
         "a job file is a mapping of keys", _raw_job("- name: x\n"), 2, ("mapping",)),
    Case("bad-set", "spec", "`--set` without `=`",
         "write it as --set a.b=value", _with_set("resources.replicas"), 2,
         ("--set", "a.b=value")),
    Case("set-into-scalar", "spec", "`--set name.x=1` (a field under a single value)",
         "name is a single value, not a mapping", _with_set("name.x=1"), 2, ("single value",)),
    Case("bad-storage-options", "spec", "`--storage-options` that are not YAML",
         "give a YAML mapping", _status_bad_storage_options, 2, ("--storage-options", "mapping")),
    # data
    Case("no-parquet", "data", "an input folder with no Parquet files",
         "input.path: no Parquet files", _input_with({"notes.txt": b"hello\n"}), 2,
         ("input.path", "parquet")),
    Case("corrupt-footer", "data", "a Parquet file with a corrupt footer",
         "names the file: fix or remove it", _corrupt_next_to_good, 2,
         ("zz-broken.parquet", "remove")),
    Case("empty-file", "data", "an empty (0 byte) `.parquet` file",
         "names the file: fix or remove it", _input_with({"empty.parquet": b""}), 2,
         ("empty.parquet", "remove")),
    Case("missing-id-column", "data", "`input.id_column` that the files do not have",
         "names the column and the columns there are",
         _missing_id_column, 2, ("ident",)),
    Case("missing-input", "data", "`input.path` that does not exist",
         "input.path: it does not exist; check the path", _submit(inp="/nonexistent/reviews/"),
         2,
         ("input.path", "/nonexistent/reviews")),
    Case("duplicate-custom-id", "data", "an OpenAI batch file with a `custom_id` twice",
         "names the custom_id and both lines",
         _input_file("req.jsonl", _request("a") + _request("b") + _request("a"),
                     "input.format=openai-batch"), 2,
         ("custom_id", '"a"', "lines 1 and 3")),
    Case("csv-open-quote", "data", "a CSV file whose quoted field is never closed",
         "names the file and the line: fix or remove it",
         _input_file("a.csv", b'review_id,body\nr1,"fine"\nr2,"open\nr3,x\n'), 2,
         ("a.csv", "line 3", "quoted field")),
    # storage
    Case("permission-denied", "storage", "an output folder this user may not write",
         "the path, permission denied: give access or choose another output.path",
         _denied_output, 1, ("permission denied", "output.path"), unprivileged=True),
    Case("output-under-a-file", "storage", "`output.path` below a regular file",
         "part of the path is a file: point output.path at a folder", _output_under_file, 2,
         ("not a folder", "output.path")),
    Case("output-is-a-file", "storage", "`output.path` that is a regular file",
         "part of the path is a file: point output.path at a folder", _output_is_file, 2,
         ("not a folder", "output.path")),
    Case("memory-output", "storage", "`output.path: memory://...` (one process only)",
         "no create-only write, Ray workers cannot see it: use a folder or s3://",
         _submit(out="memory://bad-inputs/out/"), 2, ("output.path", "s3://")),
    Case("unreachable-s3", "storage", "an S3 endpoint that does not answer",
         "cannot reach <endpoint> (after retries): check endpoint_url", _unreachable_s3, 1,
         ("cannot reach http://127.0.0.1:9", "endpoint_url")),
    Case("damaged-lease", "storage", "a lease file cut short (a writer killed mid-write)",
         "not valid JSON after 3 reads: delete it and run again", _damaged_lease, 1,
         ("not valid json", "delete it")),
    Case("status-of-nothing", "storage", "`status` of a folder no job wrote",
         "not a job file, and no batchinfer output is there", _status_of_nothing, 2,
         ("no batchinfer output",)),
    Case("changed-job", "storage", "`submit` with a changed prompt into a finished output",
         "holds output of a different job: write to a fresh output.path", _changed_prompt, 2,
         ("different job", "output.path"), needs_output=True),
    Case("unknown-gpu", "spec", "`ledger --reprice` for a GPU the price table lacks",
         "names the GPU, the priced ones, and ledger.prices.gpu", _reprice_unknown_gpu, 2,
         ("nope-9000", "ledger.prices.gpu"),
         needs_output=True),
    Case("ledger-before-a-run", "storage", "`ledger` of a job that never ran",
         "no ledger.json yet", _ledger_before_a_run, 1, ("no ledger.json yet",)),
    # environment
    Case("missing-model-dir", "environment", "`model.path` that is neither a folder nor a hub id",
         "no such model directory: point model.path at a folder", _missing_model_dir, 1,
         ("no such model directory", "model.path")),
    Case("plan-missing-model-dir", "environment", "`plan` with a missing model folder",
         "no such model directory", _plan_missing_model_dir, 1, ("no such model directory",)),
    Case("unknown-builtin", "environment", "`model.path: builtin:` a model not bundled",
         "lists the bundled models", _submit(model="{path: 'builtin:gpt-5', engine: vllm}"), 1,
         ("builtin:smollm2-135m-instruct",)),
    Case("bad-pipeline-module", "environment", "`pipeline:` a module that does not import",
         "pipeline: the module and the import error",
         _submit(extra="pipeline: no_such_module:Thing\n"), 2, ("pipeline", "no_such_module")),
    Case("bad-pipeline-class", "environment", "`pipeline:` a class the module lacks",
         "module has no class", _submit(extra="pipeline: pipelines.generate:Nope\n"), 2,
         ("no class", "nope")),
]  # fmt: skip


# --------------------------------------------------------------------------- running them


def _files(root: Path) -> dict[str, str]:
    """Every file under ``root`` and a digest of its bytes (what "nothing lost" compares)."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the reviews, the job and its finished output (the one Ray start)."""
    tmp = tmp_path_factory.mktemp("finished")
    reviews(tmp)
    res = batchinfer("submit", str(job(tmp)), "--quiet")
    assert res.returncode == 0, res.stderr
    (tmp / "quiet-run.txt").write_text(json.dumps([res.stdout, res.stderr]))
    return tmp


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_ends_in_one_line(
    case: Case, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if case.unprivileged and os.geteuid() == 0 and not shutil.which("setpriv"):
        realparts.missing(
            "setpriv", "as root, only setpriv can drop the capabilities that ignore permission "
            "bits", "apt-get install util-linux",
        )
    # a finished output is shared: each case must leave it as it is
    where = request.getfixturevalue("finished") if case.needs_output else tmp_path
    argv = case.setup(where)
    before = _files(where)
    res = batchinfer(*argv, unprivileged=case.unprivileged)
    both = res.stdout + res.stderr
    assert "Traceback" not in both, both
    lines = res.stderr.strip().splitlines()
    assert lines, f"nothing on stderr; stdout: {res.stdout}"
    last = lines[-1]
    assert last.startswith("error: "), res.stderr
    assert ";" in last or ":" in last.removeprefix("error: "), last
    for word in case.words:
        assert word.lower() in last.lower(), f"{word!r} not in {last!r}"
    assert res.returncode == case.code, res.stderr
    after = _files(where)
    changed = [p for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"files changed or lost: {changed}"


def test_quiet_prints_the_summary_line_only(finished: Path) -> None:
    stdout, stderr = json.loads((finished / "quiet-run.txt").read_text())
    assert stderr == ""
    assert len(stdout.splitlines()) == 1
    assert stdout.startswith("bad-inputs: 10 rows, 2 failed")


def test_the_catalog_covers_every_area() -> None:
    areas = {c.area for c in CASES}
    assert areas == {"spec", "data", "storage", "environment"}
    assert len(CASES) >= 20
    assert len({c.name for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------- the README


def readme_table() -> str:
    """The README's table, one line per case (checked against README.md below)."""
    lines = ["| what was wrong | what you see (`error: ...`) | exit |", "|---|---|---|"]
    lines += [f"| {c.wrong} | {c.gist} | {c.code} |" for c in CASES]
    return "\n".join(lines)


def test_readme_lists_the_catalog() -> None:
    readme = (REPO / "README.md").read_text()
    assert "## Bad inputs and what you see" in readme
    assert readme_table() in readme, "README table out of date: paste readme_table()"


# --------------------------------------------------------------------------- the mapping itself


def test_verbose_puts_the_traceback_in_the_log_before_the_line(tmp_path: Path) -> None:
    argv = _submit(out="memory://bad-inputs-verbose/out/")(tmp_path)
    res = batchinfer(*argv, "--verbose")
    assert "Traceback" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: memory://")
    assert res.returncode == 2


def test_an_unexpected_error_is_one_line_that_says_what_to_do() -> None:
    from batch.cli import _explain

    code, text = _explain(RuntimeError("boom\nsecond line"))
    assert code == 1
    assert text.startswith("RuntimeError: boom; second line; ") and "--verbose" in text


def test_a_record_caught_mid_write_is_read_again(tmp_path: Path) -> None:
    import threading

    from batch import storage

    path = tmp_path / "00000001.json"
    path.write_text('{"holder": "host-1:123", "expi')  # its writer is not done yet
    done = threading.Timer(0.1, lambda: path.write_text('{"holder": "host-1:123"}'))
    done.start()
    fs, _ = storage.open_fs(str(tmp_path))
    assert storage.read_json(fs, str(path)) == {"holder": "host-1:123"}
    done.join()
