"""The package's dependency floors: no version with a known code-execution bug when loading files."""

import re
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def floor(name: str) -> Version:
    (found,) = re.findall(rf'^\s*"{name}(?:\[[^]]*\])?>=([\w.]+)', (ROOT / "pyproject.toml").read_text(), re.M)
    return Version(found)


def test_torch_floor_loads_checkpoints_safely():
    assert floor("torch") >= Version("2.6")  # weights_only=True bypass before 2.6 (CVE-2025-32434)


def test_pyarrow_floor_reads_files_safely():
    assert floor("pyarrow") >= Version("14.0.1")  # arbitrary code from IPC/Parquet in 14.0.0 (CVE-2023-47248)
