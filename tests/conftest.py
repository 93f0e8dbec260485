from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    # Integration tests run on asyncio; modules that pin trio compatibility override this.
    return "asyncio"
