"""Known failure classes of the conformance suite, each marked xfail with its reason.

Every entry is an open gap of the drop-in issue (see the closing note that added it); remove an
entry when its class is fixed. Marks are not strict, so a class fixed in part (some of its
cases passing) does not fail the suite.
"""

import pytest

# nodeid prefix -> reason. Empty: every class this suite knows of passes.
KNOWN: dict[str, str] = {}


def pytest_collection_modifyitems(items):
    for item in items:
        for prefix, reason in KNOWN.items():
            if item.nodeid.split("tests/conformance/")[-1].startswith(prefix):
                item.add_marker(pytest.mark.xfail(reason=reason, strict=False))
