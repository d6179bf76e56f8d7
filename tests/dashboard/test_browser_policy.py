"""Without Chromium the browser tests skip with the reason outside CI, and fail in CI."""

import pytest

from tests.dashboard import conftest


@pytest.mark.parametrize("ci, outcome", [("", pytest.skip.Exception), ("true", pytest.fail.Exception)])
def test_missing_chromium_skips_outside_ci_and_fails_in_ci(monkeypatch, ci, outcome):
    monkeypatch.setattr(conftest, "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setattr(conftest.shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="needs /nonexistent/chromium"):
        conftest.require_browser()
