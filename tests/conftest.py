"""Suite-wide pytest hooks: in CI, a test skipped for a reason not listed in
``tests/skips.py`` fails instead (a missing oracle must not pass silently)."""

from __future__ import annotations

import pytest

from tests.skips import in_ci, skip_reason_allowed


def _reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:   # (file, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    reason = _reason(report)
    if not skip_reason_allowed(reason):
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI for a reason tests/skips.py does not allow: {reason!r}. "
                           "Install what the test needs (see .ci/run and scripts/host.sh), or list "
                           "the reason there if the skip does not depend on the machine.")
