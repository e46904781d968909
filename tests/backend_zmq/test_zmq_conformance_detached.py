"""The conformance suite against the detached mode: a broker and a worker host as separate
processes, shared by every server of the class (the embedded mode runs in `nox -s conformance`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from taskplex.conformance import BackendSuite
from taskplex_zmq.testing import DetachedProvider

PROVIDER = DetachedProvider()


@pytest.fixture(scope="module", autouse=True)
def _pool() -> Iterator[None]:
    try:
        yield
    finally:
        PROVIDER.close()


class TestDetachedZmq(BackendSuite):
    backend = "zmq"
    provider = PROVIDER
