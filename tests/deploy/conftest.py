"""Rendering deploy/k8s with the real kubectl, once per stage and session."""
from __future__ import annotations

import pytest

from rendered import render


@pytest.fixture(scope="session")
def kustomize():
    """render(stage) -> the objects `kubectl kustomize deploy/k8s/<stage>` prints,
    e.g. render("overlays/gpu") or render("overlays/cpu/prepare")."""
    return render
