"""The suite's root: the test toolkit (tests/support, a pytest plugin: fixtures for real
sockets on loopback, chains, per-test data dirs and the leak guard) and the scheduling of
the test files over the xdist workers."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.support.plugin"]


# The suite runs on 3 workers (pytest-xdist; the scheduler below): most of its time is spent
# waiting for simulated time, blocks and browsers, not computing. A file stays on one worker, so
# its module fixtures are built once. The files that start a whole grid of processes run in two
# streams, one file at a time each, so that a 2-core machine never runs more than two grids at
# once; the Docker and network-namespace files (machine-wide resources) are in the same stream.
HEAVY_GROUPS = {
    "tests/deploy/": "grids-a", "tests/e2e/test_two_hosts.py": "grids-a", "tests/e2e/test_kill.py": "grids-a",
    "tests/launcher/": "grids-a",
    "tests/e2e/": "grids-b", "tests/browser/": "grids-b",
}
# handed out first, so that the two streams start at once and no worker is left alone with a
# long file at the end
LONG_FIRST = ("tests/deploy/", "tests/e2e/", "tests/contracts/test_invariants.py", "tests/browser/",
              "tests/launcher/", "tests/adversarial/", "tests/chain/test_real_chain.py", "tests/chain/")


def _file_of(nodeid: str) -> str:
    return nodeid.split("::")[0]


def _group_of(nodeid: str) -> str:
    path = _file_of(nodeid)
    return next((g for prefix, g in HEAVY_GROUPS.items() if path.startswith(prefix)), path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {prefix: i for i, prefix in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: next((i for prefix, i in rank.items() if item.nodeid.startswith(prefix)), len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Scopes are the groups above (xdist's own ``xdist_group`` marker rewrites node ids, which
    pytest 9 no longer lets a plugin do); handed out in collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class GridScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group_of(nodeid)

    return GridScheduling(config, log)
