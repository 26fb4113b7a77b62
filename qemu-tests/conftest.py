"""The end-to-end QEMU suite's fixtures and hooks live in bkharness/fixtures.py (type-checked there)."""

from bkharness.fixtures import *  # noqa: F403
from bkharness.fixtures import (  # noqa: F401  (hooks must be visible by name)
    pytest_collection_modifyitems,
    pytest_runtest_call,
    pytest_runtest_makereport,
    pytest_runtest_setup,
)
