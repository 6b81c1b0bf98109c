"""Shared test fixtures: paths to the reference material in ../shared."""

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """Path into ../shared: skips when absent on a user's machine, fails when CI=true."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing: CI always has ../shared, so the path is wrong")
        pytest.skip(f"{path} not found (reference material lives in ../shared beside the checkout)")
    return path
