"""The WebDriver BiDi helper against a real headless Firefox: values both ways, errors, the console,
screenshots, and a profile that keeps the browser on loopback."""

from __future__ import annotations

import math

import pytest

from tests.dashboard.conftest import FIREFOX, require_browser, wait_until
from tests.dashboard import firefox_bidi
from tests.dashboard.firefox_bidi import BidiError, FirefoxBidi, from_remote_value, to_local_value


@pytest.fixture
def firefox(tmp_path):
    require_browser("firefox")
    with FirefoxBidi(FIREFOX, tmp_path / "firefox") as browser:
        yield browser


def test_values_errors_console_and_screenshots(firefox, tmp_path):
    firefox.get("data:text/html,<title>t</title><p id=p>hello</p>")
    sent = ["text", 3, 2.5, True, None, [1, [2, "x"]], {"a": {"b": [False]}}]
    assert firefox.execute_script("return [...arguments];", *sent) == sent
    assert firefox.execute_script("return document.getElementById(arguments[0]).textContent;", "p") == "hello"
    nan, negative_zero, infinite = firefox.execute_script("return [NaN, -0, -Infinity];")
    assert math.isnan(nan) and math.copysign(1, negative_zero) == -1 and infinite == -math.inf
    assert firefox.execute_script("return Promise.resolve(7);") == 7          # promises are awaited
    with pytest.raises(BidiError, match="the page threw: Error: broken on purpose"):
        firefox.execute_script("throw new Error('broken on purpose');")
    assert firefox.console_errors() == []
    firefox.execute_script("console.error('logged on purpose'); console.warn('only a warning');"
                           "setTimeout(() => { throw new TypeError('thrown on purpose'); }, 0);")
    # the uncaught error arrives as an event after the script returned: poll the condition
    wait_until(firefox, lambda b: len(b.console_errors()) == 2, "the errors were not reported")
    assert [(e["source"], e["message"]) for e in firefox.console_errors()] == [
        ("console", "logged on purpose"), ("javascript", "TypeError: thrown on purpose")]
    shot = firefox.screenshot(tmp_path / "page.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert firefox.current_url.startswith("data:text/html,")


def test_non_loopback_addresses_go_nowhere(firefox):
    """Every name resolves to 127.0.0.1 and every proxy is a closed loopback port: a page elsewhere
    cannot load (and no DNS query or packet leaves the machine)."""
    with pytest.raises(BidiError, match="NS_ERROR_PROXY_CONNECTION_REFUSED|NS_ERROR_CONNECTION_REFUSED"):
        firefox.get("http://bb-nowhere.invalid/")


def test_local_values_are_refused_when_the_page_cannot_take_them():
    with pytest.raises(TypeError, match="cannot pass a set"):
        to_local_value({1, 2})
    assert from_remote_value({"type": "map", "value": [[{"type": "number", "value": 1}, {"type": "string",
                                                                                       "value": "one"}]]}) == {"1": "one"}
    node = {"type": "node", "sharedId": "abc"}
    assert from_remote_value(node) is node


def test_a_browser_that_never_listens_fails_the_start_and_is_not_left_running(tmp_path, monkeypatch):
    # a "browser" that prints nothing and waits: the start times out, then stops it
    script = tmp_path / "silent-browser"
    script.write_text("#!/bin/sh\nexec sleep 600\n")
    script.chmod(0o755)
    monkeypatch.setattr(firefox_bidi, "START_TIMEOUT", 1.0)
    browser = FirefoxBidi(str(script), tmp_path / "silent")
    with pytest.raises(RuntimeError, match="no WebDriver BiDi endpoint announced"):
        browser.start()
    assert [role.proc.poll() for role in browser.group.roles] == [-15]      # SIGTERM, not left behind
