"""Fixtures shared by the manager's tests: the Vast.ai API stand-in on simulated time, and the real provider
(the vastai SDK) pointed at it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from manager.providers.vast import VastProvider
from tests.standins.vast_server import SimClock, VastStandin

VAST_KEY = "vk-0123456789abcdef-secret"  # tests assert it never reaches logs or errors


@pytest.fixture
def clock() -> SimClock:
    return SimClock()


@pytest.fixture
def standin(clock: SimClock) -> Iterator[VastStandin]:
    s = VastStandin(VAST_KEY, clock)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def vast(standin: VastStandin, clock: SimClock) -> VastProvider:
    return VastProvider(VAST_KEY, server_url=standin.url, clock=clock.now, sleep=clock.sleep)
