"""infra/terraform passes its offline checks, and the checks catch what they promise to.

No Terraform binary can be installed here, so scripts/check_terraform.py parses the HCL with
python-hcl2 (plus the structural rules a parse misses) and runs checkov offline, each in a
cached virtual environment (built once, about a minute; later runs take seconds).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check_terraform.py"
TERRAFORM = REPO / "infra" / "terraform"


def check(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the check script as CI and the README do; the first run builds the venvs."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.fixture
def tf_copy(tmp_path: Path) -> Path:
    """A scratch copy of infra/terraform to break on purpose."""
    dest = tmp_path / "terraform"
    shutil.copytree(TERRAFORM, dest, ignore=shutil.ignore_patterns(".terraform", "*.tfstate*"))
    return dest


def test_infra_terraform_passes_both_stages() -> None:
    result = check()
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "check_terraform: PASSED (structure ok, checkov ok)" in out
    # Every file parsed, checkov found nothing unskipped, and every skip carries its reason.
    parsed = re.search(r"parsed (\d+) files", out)
    assert parsed and int(parsed.group(1)) == len(list(TERRAFORM.glob("*.tf"))) + 1
    summary = re.search(r"(\d+) passed, (\d+) failed, (\d+) skipped, (\d+) parsing errors", out)
    assert summary, out
    passed, failed, skipped, errors = map(int, summary.groups())
    assert passed > 50 and failed == 0 and errors == 0
    skip_lines = [line for line in out.splitlines() if line.startswith("  skip ")]
    assert len(skip_lines) == skipped
    assert all(len(line.split(": ", 1)[1]) >= 20 for line in skip_lines)


def test_variable_without_description_fails_naming_file_and_variable(tf_copy: Path) -> None:
    with (tf_copy / "variables.tf").open("a") as fh:
        fh.write('\nvariable "gpu_quota" {\n  type    = number\n  default = 4\n}\n')
    (tf_copy / "outputs.tf").write_text(
        (tf_copy / "outputs.tf").read_text() + '\noutput "quota" {\n  value = var.gpu_quota\n}\n'
    )

    result = check("--dir", str(tf_copy), "--stage", "structure")

    assert result.returncode == 1, result.stdout + result.stderr
    assert 'variables.tf: variable "gpu_quota" has no description' in result.stdout
    assert 'outputs.tf: output "quota" has no description' in result.stdout
    assert "check_terraform: FAILED (structure failed)" in result.stdout


@pytest.mark.parametrize(
    ("file", "addition", "expected"),
    [
        ("gpu.tf", 'variable "half_written" {\n', "gpu.tf: does not parse as HCL2"),
        (
            "main.tf",
            'resource "aws_sqs_queue" "q" {\n  name = "${local.missing}-q"\n}\n',
            "main.tf: local.missing is not declared anywhere",
        ),
        (
            "variables.tf",
            'variable "untyped" {\n  description = "Used below."\n  default = 1\n}\n'
            "locals {\n  uses_untyped = var.untyped\n}\n",
            'variables.tf: variable "untyped" has no type',
        ),
        (
            "providers.tf",
            'provider "aws" {\n  alias      = "leaky"\n  access_key = "AKIAIOSFODNN7EXAMPLE"\n}\n',
            "looks like an AWS access key id",
        ),
        (
            "versions.tf",
            "terraform {\n  required_providers {\n    random = {\n"
            '      source  = "hashicorp/random"\n      version = ">= 3.0"\n    }\n  }\n}\n',
            'required provider "random" needs a version with an upper bound',
        ),
    ],
    ids=["parse-error", "unresolved-reference", "untyped-variable", "credential", "unpinned"],
)
def test_structure_stage_catches(tf_copy: Path, file: str, addition: str, expected: str) -> None:
    with (tf_copy / file).open("a") as fh:
        fh.write("\n" + addition)

    result = check("--dir", str(tf_copy), "--stage", "structure")

    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stdout


def test_checkov_stage_fails_on_a_finding_and_on_a_skip_without_reason(tf_copy: Path) -> None:
    storage = tf_copy / "storage.tf"
    text = storage.read_text()
    # A skip that gives no reason is not accepted...
    text, n = re.subn(
        r"#checkov:skip=CKV2_AWS_62:Nothing consumes event notifications[^\n]*",
        "#checkov:skip=CKV2_AWS_62",
        text,
    )
    assert n == 1
    storage.write_text(
        text
        # ...and neither is a new bucket that is not versioned (and more).
        + '\nresource "aws_s3_bucket" "scratch" {\n  bucket = "batchinfer-scratch"\n}\n'
    )

    result = check("--dir", str(tf_copy), "--stage", "checkov")

    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"FAIL CKV_AWS_21 \(.*\) aws_s3_bucket.scratch storage.tf", result.stdout)
    assert "FAIL skip of CKV2_AWS_62 at storage.tf aws_s3_bucket.logs gives no reason" in (
        result.stdout
    )
