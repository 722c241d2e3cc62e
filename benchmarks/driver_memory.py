"""Where the driver's memory goes per chunk (issue 16): a fake-engine job run in this process
under tracemalloc, with a snapshot when a fifth of the chunks have committed and one near the
end; prints the growth per chunk in Python objects and the allocation sites that grew most.

Compare its total with the RSS growth ``benchmarks/orchestration.py`` reports for the same
sizes: what tracemalloc does not see (Ray's C++ core worker, allocator arenas) is the rest.
tracemalloc slows the driver down several times; keep the job small::

    .venv/bin/python benchmarks/driver_memory.py --rows 60000 --rows-per-chunk 100
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=60_000)
    p.add_argument("--rows-per-chunk", type=int, default=100)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--work", type=Path, default=None)
    a = p.parse_args()
    import fsspec
    import orchestration

    from batch import job as jobmod
    from batch.progress import JsonLogReporter
    from batch.spec import parse_spec

    work = a.work or Path(tempfile.mkdtemp(prefix="driver-memory-"))
    orchestration.write_input(fsspec.filesystem("file"), str(work / "in"), a.rows)
    text = orchestration.job_yaml(f"{work / 'in'}/", f"{work / 'out'}/", a.rows_per_chunk, {})
    spec = parse_spec(text, source="job")
    total = -(-a.rows // a.rows_per_chunk)
    marks = (total // 5, total - 5)
    snaps: dict[int, Any] = {}
    seen = [0]
    original = JsonLogReporter.chunk_done

    def chunk_done(self: JsonLogReporter, stats: dict[str, Any]) -> None:
        seen[0] += 1
        if seen[0] in marks:
            snaps[seen[0]] = tracemalloc.take_snapshot()
        original(self, stats)

    JsonLogReporter.chunk_done = chunk_done  # type: ignore[method-assign]
    tracemalloc.start(8)
    jobmod.run_job(spec, JsonLogReporter(io.StringIO()))
    a_n, b_n = marks
    diff = snaps[b_n].compare_to(snaps[a_n], "traceback")
    grown = sum(d.size_diff for d in diff)
    print(f"Python objects grew {grown / 1024 / (b_n - a_n):.1f} KiB per chunk "
          f"between chunk {a_n} and {b_n} of {total}")  # fmt: skip
    for d in diff[: a.top]:
        print(f"{d.size_diff / 1024 / (b_n - a_n):8.2f} KiB/chunk  {d.count_diff:7d} blocks")
        for line in d.traceback.format()[-4:]:
            print("    " + line)


if __name__ == "__main__":
    main()
