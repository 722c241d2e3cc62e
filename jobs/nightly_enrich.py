"""Nightly enrichment of the day's product reviews: an example Airflow DAG for batchinfer.

Every night it runs jobs/enrich.yaml over that day's partition of reviews::

    input   <input base>/dt=2026-01-01/     Parquet, e.g. s3://my-bucket/reviews/dt=2026-01-01/
    output  <output base>/dt=2026-01-01/    data/, _failed/, _MANIFEST.json, ledger.json

and hands the next task only the manifest's URI and the run's totals (rows, tokens, cost).

Re-running a day is safe: the run id is the job's name, the logical date and a digest of
the spec's fingerprint and output path, so a retry or a cleared task attaches to the day's
run (or resumes it) and never writes a row twice.

Settings, each an Airflow Variable or else an environment variable of the same name in
capitals (``BATCHINFER_RAY_ADDRESS``, ...), else the default below:

    batchinfer_ray_address  http://HEAD:8265: run on that Ray cluster (the task defers; needs a
                            triggerer), e.g. http://batchinfer-head-svc.batchinfer.svc:8265 for
                            the RayCluster of infra/terraform/README.md. Empty: run on the
                            worker with batchinfer_bin.
    batchinfer_input_base   where the daily input partitions are
    batchinfer_output_base  where the daily outputs go
    batchinfer_job          the job file (default: enrich.yaml beside this file)
    batchinfer_bin          batchinfer with an engine installed, for runs on the worker

Try one day without a scheduler: ``python jobs/nightly_enrich.py 2026-01-01``.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Variable, dag, task

from batch.airflow import BatchInferOperator

DEFAULTS = {
    "batchinfer_ray_address": "",
    "batchinfer_input_base": "s3://my-bucket/reviews",
    "batchinfer_output_base": "s3://my-bucket/enriched",
    "batchinfer_job": str(Path(__file__).with_name("enrich.yaml")),
    "batchinfer_bin": "batchinfer",
}


def setting(name: str) -> str:
    """Read when the task runs (not when the DAG is parsed): Variable, environment, default."""
    value = Variable.get(name, default=None) or os.environ.get(name.upper())
    return str(value) if value else DEFAULTS[name]


@dag(
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={
        # Safe to retry: a retry attaches to the day's run or resumes it from its markers.
        "retries": 2,
        "retry_delay": timedelta(minutes=5),
        "execution_timeout": timedelta(hours=6),
    },
    user_defined_macros={"setting": setting},
    tags=["batchinfer"],
)
def nightly_enrich() -> None:
    enrich = BatchInferOperator(
        task_id="enrich_reviews",
        job="{{ setting('batchinfer_job') }}",
        overrides={
            "input.path": "{{ setting('batchinfer_input_base') }}/dt={{ ds }}/",
            "output.path": "{{ setting('batchinfer_output_base') }}/dt={{ ds }}/",
        },
        address="{{ setting('batchinfer_ray_address') }}",
        batchinfer_bin="{{ setting('batchinfer_bin') }}",
    )

    @task
    def report(result: dict[str, Any]) -> None:
        """What a downstream task sees: the manifest's URI and totals, never the rows."""
        print(
            f"enriched {result['rows']} reviews ({result['failed_rows']} failed), "
            f"{result['input_tokens']} + {result['output_tokens']} tokens, "
            f"${result['run_cost_usd']} (cheapest batch API: "
            f"${result['comparisons_best_batch_usd']}): {result['manifest']}"
        )

    report(enrich.output)


nightly = nightly_enrich()


if __name__ == "__main__":
    import sys

    day = datetime.fromisoformat(sys.argv[1]) if len(sys.argv) > 1 else datetime.now(UTC).date()
    nightly.test(logical_date=datetime(day.year, day.month, day.day, tzinfo=UTC))
