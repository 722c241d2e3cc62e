#!/usr/bin/env python3
"""Check infra/terraform without a Terraform binary (none can be installed here).

Two stages, each in its own cached virtual environment (they cannot share one: checkov
depends on bc-python-hcl2, which ships the same top-level ``hcl2`` package as python-hcl2
and overwrites it):

1. structure: every .tf file (and terraform.tfvars.example) parses with python-hcl2, and
   the things a parse alone misses hold: variables have a description and a type,
   validations only refer to their own variable (Terraform < 1.9 rejects anything else),
   outputs have a description, providers and modules are pinned, every var./local./
   module./data./resource reference resolves, every variable is used, the example tfvars
   sets only declared variables, and no credentials are written into the files;
2. checkov: ``checkov -d DIR --framework terraform`` offline; any failed check fails the
   run, and every skip must be an inline ``#checkov:skip=CKV_ID:reason`` with a reason.

Usage: python scripts/check_terraform.py [--dir infra/terraform]
Exit status: 0 all checks passed, 1 a check failed, 2 the tools could not be set up.
The virtual environments live under ${BATCHINFER_HOME:-~/.cache/batchinfer}/venvs and are
reused once a stamp file says they are complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import toolvenv
from toolvenv import SetupError, python_of

HCL2_VERSION = "8.1.4"
CHECKOV_VERSION = "3.3.30"

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / "infra" / "terraform"

# A skip reason shorter than this says nothing ("ok", "n/a", "false positive").
MIN_SKIP_REASON = 20


@dataclass(frozen=True)
class Tool:
    """A pinned tool in its own virtual environment."""

    name: str
    version: str
    requirement: str

    def venv(self) -> Path:
        return toolvenv.venvs_dir() / f"{self.name}-{self.version}"


HCL2 = Tool("hcl2", HCL2_VERSION, f"python-hcl2=={HCL2_VERSION}")
CHECKOV = Tool("checkov", CHECKOV_VERSION, f"checkov=={CHECKOV_VERSION}")
STAMP = ".batchinfer-complete"


def ensure_venv(tool: Tool) -> Path:
    """Return the tool's venv, building it first unless its stamp says it is complete.

    The stamp names the requirement and the base interpreter the venv runs on (the same
    for the system python and any venv made from it), so a change of either rebuilds it;
    it is written last, so an interrupted build is redone.
    """
    venv = tool.venv()
    expected = f"{tool.requirement}\n{sys.base_prefix}\n{sys.version.split()[0]}\n"
    with toolvenv.locked(venv):
        if toolvenv.is_stamped(venv, STAMP, expected):
            return venv
        print(f"  building {venv} ({tool.requirement}), once", flush=True)
        toolvenv.create(venv, [tool.requirement])
        toolvenv.write_stamp(venv, STAMP, expected)
    return venv


# ---------------------------------------------------------------------------------------
# Stage 1: structure. Runs inside the python-hcl2 venv (``--structure-worker DIR``), prints
# one JSON object; everything above the worker only uses the standard library.
# ---------------------------------------------------------------------------------------

REF_PATTERNS = {
    "var": re.compile(r"\bvar\.([A-Za-z_][\w-]*)"),
    "local": re.compile(r"\blocal\.([A-Za-z_][\w-]*)"),
    "module": re.compile(r"\bmodule\.([A-Za-z_][\w-]*)"),
    "data": re.compile(r"\bdata\.([A-Za-z_][\w-]*)\.([A-Za-z_][\w-]*)"),
    "resource": re.compile(
        r"(?<![\w.])((?:aws|kubernetes|helm|kubectl|null|random|time|tls)_[\w]+|terraform_data)"
        r"\.([A-Za-z_][\w-]*)"
    ),
}
# Attribute names that must never hold a literal value in these files.
SECRET_KEYS = re.compile(
    r"^(access_key|secret_key|secret_access_key|aws_secret_access_key|session_token|token|"
    r"password|repository_password|api_key|client_secret|private_key|client_key)$",
    re.IGNORECASE,
)
SECRET_TEXT = [
    (re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (
        re.compile(r"aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+=]{40}"),
        "an AWS secret access key",
    ),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"), "a GitHub token"),
]
PINNED = re.compile(r"^\s*(=\s*)?v?\d+\.\d+(\.\d+)?([-+][\w.]+)?\s*$|~>|<")


def unquote(value: Any) -> Any:
    """python-hcl2 >= 7 keeps the quotes of string literals and block labels."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def clean(node: Any) -> Any:
    """Drop python-hcl2's bookkeeping keys (comments, block markers) and unquote labels."""
    if isinstance(node, dict):
        return {unquote(k): clean(v) for k, v in node.items() if not str(k).startswith("__")}
    if isinstance(node, list):
        return [clean(v) for v in node]
    return unquote(node)


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


def is_literal(value: Any) -> bool:
    """A plain string written into the file, as opposed to an expression or reference."""
    return isinstance(value, str) and value != "" and "${" not in value


def blocks(doc: dict[str, Any], kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, body) of each ``kind "label" { ... }`` block of a cleaned document."""
    for entry in doc.get(kind, []):
        for label, body in entry.items():
            yield label, body if isinstance(body, dict) else {}


def two_label_blocks(doc: dict[str, Any], kind: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for entry in doc.get(kind, []):
        for type_, named in entry.items():
            for name, body in named.items():
                yield type_, name, body if isinstance(body, dict) else {}


def structure_problems(tf_dir: Path) -> tuple[list[str], list[str]]:
    """Parse everything in ``tf_dir``; return (files that parsed, problems). Needs python-hcl2."""
    import hcl2  # only importable inside the python-hcl2 venv

    problems: list[str] = []
    docs: dict[str, dict[str, Any]] = {}
    files = sorted(tf_dir.glob("*.tf"))
    if not files:
        return [], [f"{tf_dir}: no .tf files"]
    extra = [p for p in [tf_dir / "terraform.tfvars.example"] if p.is_file()]
    for path in [*files, *extra]:
        text = path.read_text()
        for pattern, what in SECRET_TEXT:
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f"{path.name}:{line}: looks like {what}; never commit credentials")
        try:
            docs[path.name] = clean(hcl2.loads(text))
        except Exception as e:  # the parser raises several unrelated types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problems.append(f"{path.name}: does not parse as HCL2: {first}")

    tf_docs = {name: doc for name, doc in docs.items() if name.endswith(".tf")}
    declared: dict[str, set[str]] = {"var": set(), "local": set(), "module": set()}
    data_sources: set[tuple[str, str]] = set()
    resources: set[tuple[str, str]] = set()
    variable_file: dict[str, str] = {}

    for fname, doc in tf_docs.items():
        for name, body in blocks(doc, "variable"):
            declared["var"].add(name)
            variable_file[name] = fname
            if not str(body.get("description", "")).strip():
                problems.append(f'{fname}: variable "{name}" has no description')
            if "type" not in body:
                problems.append(f'{fname}: variable "{name}" has no type')
            for validation in body.get("validation", []):
                others = set(REF_PATTERNS["var"].findall(str(validation.get("condition", ""))))
                if others - {name}:
                    problems.append(
                        f'{fname}: variable "{name}" validation refers to '
                        f"{', '.join(sorted('var.' + o for o in others - {name}))}; Terraform "
                        "< 1.9 only allows the variable itself (check it in main.tf instead)"
                    )
                if not str(validation.get("error_message", "")).strip():
                    problems.append(
                        f'{fname}: variable "{name}" has a validation without error_message'
                    )
        for name, body in blocks(doc, "output"):
            if not str(body.get("description", "")).strip():
                problems.append(f'{fname}: output "{name}" has no description')
        for entry in doc.get("locals", []):
            declared["local"].update(entry)
        for name, body in blocks(doc, "module"):
            declared["module"].add(name)
            source = str(body.get("source", ""))
            if source.startswith(("./", "../")):
                continue
            if source.startswith("git::") or "github.com" in source:
                if "?ref=" not in source:
                    problems.append(f'{fname}: module "{name}" source {source} has no ?ref= pin')
            elif not PINNED.search(str(body.get("version", ""))):
                problems.append(
                    f'{fname}: module "{name}" ({source}) needs a pinned version '
                    '(exact "1.2.3" or "~> 1.2"), not ' + repr(body.get("version"))
                )
        for type_, name, _ in two_label_blocks(doc, "data"):
            data_sources.add((type_, name))
        for type_, name, _ in two_label_blocks(doc, "resource"):
            resources.add((type_, name))
        for name, body in blocks(doc, "provider"):
            for key in body:
                if SECRET_KEYS.match(key):
                    problems.append(
                        f'{fname}: provider "{name}" sets {key}; credentials must come from '
                        "the environment, not the configuration"
                    )

    settings = [(f, b) for f, doc in tf_docs.items() for b in doc.get("terraform", [])]
    if not settings:
        problems.append("no terraform { } block (required_version, required_providers)")
    if settings and not any(b.get("required_version") for _, b in settings):
        problems.append(f"{settings[0][0]}: terraform block has no required_version")
    required: set[str] = set()
    for fname, block in settings:
        for entry in block.get("required_providers", []):
            for pname, spec in entry.items():
                required.add(pname)
                if not isinstance(spec, dict) or not spec.get("source"):
                    problems.append(f'{fname}: required provider "{pname}" has no source')
                    continue
                if not PINNED.search(str(spec.get("version", ""))):
                    problems.append(
                        f'{fname}: required provider "{pname}" needs a version with an upper '
                        f'bound ("~> 1.2", "< 2.0" or exact), not {spec.get("version")!r}'
                    )
    for fname, doc in tf_docs.items():
        for name, _ in blocks(doc, "provider"):
            if name not in required:
                problems.append(
                    f'{fname}: provider "{name}" is configured but not in required_providers'
                )

    # Every reference resolves, wherever it is written.
    used_vars: set[str] = set()
    for fname, doc in tf_docs.items():
        unresolved: set[str] = set()
        for s in strings(doc):
            if "${" not in s:
                continue
            for kind in ("var", "local", "module"):
                for ref in REF_PATTERNS[kind].findall(s):
                    if kind == "var":
                        used_vars.add(ref)
                    if ref not in declared[kind]:
                        unresolved.add(f"{kind}.{ref}")
            for type_, name in REF_PATTERNS["data"].findall(s):
                if (type_, name) not in data_sources:
                    unresolved.add(f"data.{type_}.{name}")
            for type_, name in REF_PATTERNS["resource"].findall(s):
                if (type_, name) not in resources:
                    unresolved.add(f"{type_}.{name}")
        problems += [f"{fname}: {ref} is not declared anywhere" for ref in sorted(unresolved)]
        # No literal credentials anywhere (references to data sources or variables are fine).
        for type_, name, body in two_label_blocks(doc, "resource"):
            for key, value in body.items():
                if SECRET_KEYS.match(key) and is_literal(value):
                    problems.append(f"{fname}: {type_}.{name} has a literal {key}; use a reference")
    for name in sorted(declared["var"] - used_vars):
        problems.append(f'{variable_file[name]}: variable "{name}" is declared but never used')

    example = docs.get("terraform.tfvars.example")
    if example is not None:
        for key in example:
            if key not in declared["var"]:
                problems.append(
                    f'terraform.tfvars.example: sets "{key}", which is not a declared variable'
                )

    return [p.name for p in [*files, *extra] if p.name in docs], problems


def structure_worker(tf_dir: Path) -> int:
    parsed, problems = structure_problems(tf_dir)
    print(json.dumps({"parsed": parsed, "problems": problems}))
    return 0


# ---------------------------------------------------------------------------------------
# Orchestration (standard library only).
# ---------------------------------------------------------------------------------------


def run_structure(tf_dir: Path) -> tuple[bool, list[str]]:
    venv = ensure_venv(HCL2)
    proc = subprocess.run(
        [str(python_of(venv)), str(Path(__file__).resolve()), "--structure-worker", str(tf_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SetupError(f"structure worker failed:\n{proc.stdout}{proc.stderr}")
    result = json.loads(proc.stdout)
    lines = [f"  parsed {len(result['parsed'])} files: {', '.join(result['parsed'])}"]
    lines += [f"  FAIL {p}" for p in result["problems"]]
    return not result["problems"], lines


def offline_env() -> dict[str, str]:
    """Checkov's environment: no platform key (so it never calls home) and quiet logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "PRISMA_"))}
    env["LOG_LEVEL"] = "ERROR"
    env["CHECKOV_RUN_SCA_PACKAGE_SCAN_V2"] = "false"
    return env


def run_checkov(tf_dir: Path) -> tuple[bool, list[str], dict[str, Any]]:
    venv = ensure_venv(CHECKOV)
    checkov = python_of(venv).parent / "checkov"
    cmd = [
        str(checkov),
        "-d",
        str(tf_dir),
        "--framework",
        "terraform",
        "--compact",
        "--skip-download",
        "--download-external-modules",
        "false",
        "--output",
        "json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=offline_env())
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise SetupError(
            f"checkov did not print a JSON report ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        ) from None
    if isinstance(report, list):  # one entry per framework; there is one here
        report = report[0]
    results = report.get("results", {})
    summary = report.get("summary", {"passed": 0, "failed": 0, "skipped": 0, "parsing_errors": 0})
    lines = [
        f"  checkov {summary.get('checkov_version', CHECKOV_VERSION)}: "
        f"{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped, "
        f"{summary.get('parsing_errors', 0)} parsing errors"
    ]
    ok = summary["failed"] == 0 and summary.get("parsing_errors", 0) == 0
    for check in results.get("failed_checks", []):
        severity = check.get("severity") or "severity unknown offline"
        lo, hi = check.get("file_line_range", [0, 0])
        lines.append(
            f"  FAIL {check['check_id']} ({severity}) {check['resource']} "
            f"{check['file_path'].lstrip('/')}:{lo}-{hi}: {check['check_name']}"
        )
    for path in results.get("parsing_errors", []):
        lines.append(f"  FAIL checkov could not parse {path}")
    for check in results.get("skipped_checks", []):
        reason = (check.get("check_result") or {}).get("suppress_comment") or ""
        where = f"{check['file_path'].lstrip('/')} {check['resource']}"
        if len(reason.strip()) < MIN_SKIP_REASON or reason.strip() == "No comment provided":
            ok = False
            lines.append(
                f"  FAIL skip of {check['check_id']} at {where} gives no reason; write "
                f"#checkov:skip={check['check_id']}:<why this does not apply here>"
            )
        else:
            lines.append(f"  skip {check['check_id']} {where}: {reason.strip()}")
    if not results and proc.returncode not in (0, 1):
        raise SetupError(f"checkov failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return ok, lines, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="Terraform directory")
    parser.add_argument(
        "--stage",
        choices=["all", "structure", "checkov"],
        default="all",
        help="run both stages (default) or one of them",
    )
    parser.add_argument(
        "--setup-only", action="store_true", help="only build (or reuse) the two tool venvs"
    )
    parser.add_argument("--structure-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.structure_worker:
        return structure_worker(args.structure_worker)
    toolvenv.exit_on_sigterm()
    if args.setup_only:
        try:
            for tool in (HCL2, CHECKOV):
                print(ensure_venv(tool))
        except SetupError as e:
            print(f"check_terraform: could not set up the tools: {e}", file=sys.stderr)
            return 2
        return 0

    tf_dir: Path = args.dir.resolve()
    if not tf_dir.is_dir():
        print(f"check_terraform: {tf_dir} is not a directory", file=sys.stderr)
        return 2
    stages = ["structure", "checkov"] if args.stage == "all" else [args.stage]
    started = time.monotonic()
    print(f"check_terraform: {tf_dir}")
    verdicts: dict[str, bool] = {}
    try:
        for i, stage in enumerate(stages, 1):
            t0 = time.monotonic()
            if stage == "structure":
                print(f"[{i}/{len(stages)}] structure (python-hcl2 {HCL2_VERSION})", flush=True)
                verdicts[stage], lines = run_structure(tf_dir)
            else:
                print(f"[{i}/{len(stages)}] checkov {CHECKOV_VERSION} (offline)", flush=True)
                verdicts[stage], lines, _ = run_checkov(tf_dir)
            print("\n".join(lines))
            print(f"  {'ok' if verdicts[stage] else 'FAILED'} in {time.monotonic() - t0:.1f} s")
    except SetupError as e:
        print(f"check_terraform: could not set up the tools: {e}", file=sys.stderr)
        return 2

    ok = all(verdicts.values())
    parts = ", ".join(f"{name} {'ok' if good else 'failed'}" for name, good in verdicts.items())
    elapsed = time.monotonic() - started
    print(f"check_terraform: {'PASSED' if ok else 'FAILED'} ({parts}) in {elapsed:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
