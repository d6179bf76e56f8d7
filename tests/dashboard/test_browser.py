"""The dashboard in real headless Chromium and Firefox, on a real boxd with traffic flowing."""

from __future__ import annotations

from tests.dashboard.conftest import Traffic, console_errors, screenshot, wait_until
from tools import demo_panels as verticals


def text(driver, element_id: str) -> str:
    # one script call: the page re-renders every second, so element handles go stale quickly
    return driver.execute_script("const e = document.getElementById(arguments[0]); return e ? e.textContent : null;",
                                 element_id)


def rule_packets(driver) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll('#rules tbody tr')].reduce((n, tr) => n + Number(tr.dataset.packets), 0);")


def total_pps(driver) -> float:
    return float(driver.execute_script("return Number(document.getElementById('total-pps').dataset.value || 0);"))


def count(driver, selector: str) -> int:
    return driver.execute_script("return document.querySelectorAll(arguments[0]).length;", selector)


def panel_text(driver, booster: str) -> str | None:
    return driver.execute_script(
        "const p = document.querySelector(`#panels .panel[data-booster=\"${arguments[0]}\"]`);"
        "return p ? p.textContent : null;", booster)


def panel(driver, booster: str) -> bool:
    return panel_text(driver, booster) is not None


async def test_page_is_live_and_counters_follow_the_traffic(box, browser):
    browser.get(box.http_url + "/")
    wait_until(browser, lambda d: text(d, "conn-state") == "live", "the event stream never opened")
    wait_until(browser, lambda d: count(d, '#boosters tbody tr[data-booster="udp-counter"]') == 1,
               "the booster is not listed")
    assert text(browser, "engine") == "engine user"
    before = rule_packets(browser)
    with Traffic(box.udp_port, rate=2000) as traffic:
        wait_until(browser, lambda d: rule_packets(d) >= before + 500, "the rule's packet counter did not move")
        wait_until(browser, lambda d: total_pps(d) > 0, "the rate stayed at zero")
        wait_until(browser, lambda d: count(d, '#chart path[data-series="matched packets/s"]') == 1,
                   "no traffic line in the chart")
        shot = screenshot(browser, "dashboard.png")
    assert traffic.sent > 0 and shot.stat().st_size > 10_000
    assert console_errors(browser) == []


async def test_with_a_token_the_page_loads_and_goes_live(token_box, browser):
    # without the token the page loads (loopback) but its stream is refused: never live
    browser.get(token_box.http_url + "/")
    wait_until(browser, lambda d: (text(d, "conn-state") or "").startswith("refused"),
               "the refused stream was not noticed")
    # with ?token= the page load sets the cookie the stream presents; the token leaves the URL
    browser.get(token_box.http_url + "/?token=" + token_box.http_token)
    wait_until(browser, lambda d: text(d, "conn-state") == "live", "the event stream never opened")
    assert token_box.http_token not in browser.current_url
    cookie = browser.get_cookie("boxd_dashboard")
    assert cookie["httpOnly"] and token_box.http_token not in cookie["value"]
    wait_until(browser, lambda d: count(d, '#boosters tbody tr[data-booster="udp-counter"]') == 1,
               "the booster is not listed")
    before = rule_packets(browser)
    with Traffic(token_box.udp_port, rate=2000):
        wait_until(browser, lambda d: rule_packets(d) >= before + 500, "the rule's packet counter did not move")
        wait_until(browser, lambda d: total_pps(d) > 0, "the rate stayed at zero")
    browser.refresh()                       # the cookie alone keeps it live
    wait_until(browser, lambda d: text(d, "conn-state") == "live", "the stream did not reopen with the cookie")
    # the refused stream of the first load is the only console error (Chromium logs its 401,
    # Firefox that it "can't establish a connection" to it)
    errors = console_errors(browser)
    assert errors and all(f"{token_box.http_url}/api/events" in entry["message"] for entry in errors), errors


async def test_booster_panel_appears_draws_every_road_and_goes(box, browser, panel_boosters):
    browser.get(box.http_url + "/")
    wait_until(browser, lambda d: text(d, "conn-state") == "live", "the event stream never opened")
    assert not panel(browser, "fcd-test")
    booster = await panel_boosters(box, "fcd-test", "fcd")
    wait_until(browser, lambda d: panel(d, "fcd-test"), "the fcd panel did not appear")
    city = verticals.fcd_builder()[1]
    roads = browser.execute_script(
        "return [...document.querySelectorAll('#panels .panel[data-booster=\"fcd-test\"] svg polyline.road')]"
        ".map(r => [Number(r.dataset.index), r.getAttribute('stroke'), r.getAttribute('points')]);")
    assert sorted(index for index, _, _ in roads) == list(range(city.n_roads))     # every road, once
    assert all(len(points.split()) == 2 for _, _, points in roads)
    assert len({stroke for _, stroke, _ in roads}) > 1          # roads differ by queue length
    lights = sum(len(light.roads) for light in city.lights)
    assert count(browser, '#panels .panel[data-booster="fcd-test"] svg circle.marker') == lights
    screenshot(browser, "dashboard-fcd-panel.png")
    await booster.stop()
    wait_until(browser, lambda d: not panel(d, "fcd-test"), "the panel stayed after its booster left")
    wait_until(browser, lambda d: "fcd-test (pid" in text(d, "events") and "left" in text(d, "events"),
               "the departure is not in the recent events")
    assert console_errors(browser) == []


async def test_gnutella_and_mmpog_panels_and_a_refused_one(box, browser, panel_boosters):
    for name, kind in (("gnutella-test", "gnutella"), ("mmpog-test", "mmpog"), ("broken-test", "invalid")):
        await panel_boosters(box, name, kind)
    browser.get(box.http_url + "/")
    wait_until(browser, lambda d: all(panel(d, n) for n in ("gnutella-test", "mmpog-test", "broken-test")),
               "not every panel appeared")
    gnutella = '#panels .panel[data-booster="gnutella-test"]'
    assert count(browser, gnutella + " circle.node") == 1 + 5 + 2
    counts = browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(t => t.textContent);", gnutella + " text.count")
    assert sorted(counts) == ["47", "48"]
    assert count(browser, '#panels .panel[data-booster="mmpog-test"] .part-table tbody tr') == 3
    refused = panel_text(browser, "broken-test")
    assert "panel refused" in refused and "needs at least 4 entries" in refused
    screenshot(browser, "dashboard-panels.png")
    assert console_errors(browser) == []
