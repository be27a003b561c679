"""pyflakes' checks (undefined names, unused imports and variables) over the code and the tests."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_no_pyflakes_findings():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--no-cache", "services", "tests",
                             "bench", "protos"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:]
