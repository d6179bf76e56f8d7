"""Without a browser the browser tests skip with the reason outside CI, and fail in CI."""

import pytest

from tests.dashboard import conftest


@pytest.mark.parametrize("ci, outcome", [("", pytest.skip.Exception), ("true", pytest.fail.Exception)])
@pytest.mark.parametrize("browser_name, attribute", [("chromium", "CHROMIUM"), ("firefox", "FIREFOX")])
def test_missing_browser_skips_outside_ci_and_fails_in_ci(monkeypatch, ci, outcome, browser_name, attribute):
    monkeypatch.setattr(conftest, attribute, f"/nonexistent/{browser_name}")
    monkeypatch.setattr(conftest.shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match=f"needs /nonexistent/{browser_name}"):
        conftest.require_browser(browser_name)

