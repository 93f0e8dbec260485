"""What a test needs from the machine: system tools and root. Outside CI a missing one skips
the test with one line naming how to get it; under ``CI=true`` (``.ci/run`` installs them) it
fails, so CI can never pass by skipping."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

__all__ = ["need_root", "need_tool"]

BIN = Path(sys.executable).parent


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must run this test)")
    pytest.skip(reason)


def need_tool(name: str, install: str) -> str:
    """The path of *name*; *install* is the command that provides it."""
    found = shutil.which(name) or shutil.which(name, path=str(BIN))
    if found is None:
        _missing(f"{name} not found: {install}")
    assert found is not None
    return found


def need_root(why: str) -> None:
    if os.geteuid() != 0:
        _missing(f"needs root: {why}")
