from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

# Shared 2-core CI machines run the suite's real servers beside hypothesis: no per-example
# deadline (no timing assertions in unit tests) and no "too slow" health check.
settings.register_profile(
    "imsd", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.load_profile("imsd")


@pytest.fixture
def anyio_backend() -> str:
    # Integration tests run on asyncio; modules that pin trio compatibility override this.
    return "asyncio"
