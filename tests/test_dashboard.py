"""The dashboard, end to end in headless Chromium: loads offline, no console errors, right numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import async_playwright, expect

from .conftest import Clock, Proxy, workload
from .fake_upstream import Behavior, FakeUpstream

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# The flags this closed machine needs: no background calls to Google, no sandbox as root.
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ADMIN = "admin-token-for-the-dashboard"


@pytest.fixture
async def guarded(raw_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("TG_TEST_ADMIN", ADMIN)
    raw_config["server"]["admin_token_env"] = "TG_TEST_ADMIN"
    raw_config["upstreams"]["gpt4o_cloud"]["limits"] = {"rpm": 10, "rpd": 5, "tpm": 150000}
    raw_config["cache"] = {"rules": [{"upstreams": ["ollama_local"]}]}
    raw_config["budgets"] = {"nube": {"usd": 0.02, "period": "day", "upstream": "gpt4o_cloud"}}
    p = Proxy(raw_config)
    await p.start()
    yield p
    await p.stop()


# Counts the pixels a canvas has drawn (any not fully transparent).
_INKED = """canvas => { const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
                         let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""
CHARTS = ("usage-chart", "cost-chart", "latency-chart", "errors-chart", "heat-chart", "users-chart", "types-chart")


async def test_dashboard_shows_what_stats_says(guarded: Proxy, fake: FakeUpstream, chromium: str) -> None:
    """After a known workload, headless Chromium: no console error, nothing fetched from outside,
    every figure as /stats says, every chart drawn, the words in the configured language and
    switchable, the range selector asking for the range, the calls table filtered; a screenshot
    in the light and the dark theme."""
    await workload(guarded, fake)  # 2 cloud calls, 1 local, 1 bad request
    fake.behavior = Behavior(prompt_tokens=7, chunks=2, completion_per_chunk=3)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as s:
        for _ in range(2):
            async with s.post(guarded.url + "/v1/chat/completions",
                              json={"model": "gpt-4o", "messages": [], "user": "ana"}) as r:
                assert r.status == 200
        for expected in ("miss", "hit"):                 # the same question twice: one from the cache
            async with s.post(guarded.url + "/api/chat", json={
                    "model": "llama3.2", "stream": False, "options": {"temperature": 0},
                    "messages": [{"role": "user", "content": "¿Horario?"}]}) as r:
                assert r.status == 200 and r.headers["X-Tollgate-Cache"] == expected
        async with s.post(guarded.url + "/v1/chat/completions",     # over the day's budget: refused
                          json={"model": "gpt-4o", "messages": [], "max_tokens": 1000}) as r:
            assert r.status == 429
        await guarded.settled()
        async with s.get(guarded.url + "/stats") as r:
            stats = await r.json()
    problems: list[str] = []
    external: list[str] = []
    asked: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=FLAGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("request", lambda r: asked.append(r.url) if r.url.startswith(guarded.url)
                else external.append(r.url))
        # Without the token: the login form, not the numbers.
        response = await page.goto(guarded.url + "/dashboard")
        assert response is not None and response.status == 401
        assert await page.locator("input[name=token]").count() == 1
        problems.clear()  # the 401 itself is logged by the browser as a failed resource
        # The token once in the URL: it becomes a cookie and leaves the address bar.
        await page.emulate_media(color_scheme="light")
        await page.goto(guarded.url + f"/dashboard?token={ADMIN}")
        assert page.url == guarded.url + "/dashboard"
        await page.wait_for_selector("body[data-loaded]")
        text = {i: await page.text_content(f"#{i}") for i in
                ("title", "total-requests", "errors", "success-rate", "tokens-total", "cost", "projection", "uptime",
                 "cache-hits", "cache-share", "cache-tokens", "cache-rate", "updated")}
        inked = {chart: await page.eval_on_selector(f"#{chart}", _INKED) for chart in CHARTS}
        gauges = await page.eval_on_selector_all(
            ".gauge", "els => els.map(e => [e.dataset.scope || e.dataset.budget, e.dataset.limit, e.className, "
                      "e.textContent])")
        total = await page.get_attribute("#usage-chart", "data-total")
        calls = await page.locator("#calls tr").count() - 1
        headings = await page.eval_on_selector_all("section h2", "els => els.map(e => e.textContent)")
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "dashboard-light.png"), full_page=True)
        light = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        await page.emulate_media(color_scheme="dark")
        dark = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        await page.screenshot(path=str(ARTIFACTS / "dashboard-dark.png"), full_page=True)
        dark_inked = await page.eval_on_selector("#usage-chart", _INKED)
        # On a phone: one column, nothing wider than the screen.
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.reload()
        await page.wait_for_selector("body[data-loaded]")
        phone_width = await page.evaluate("document.documentElement.scrollWidth")
        await page.screenshot(path=str(ARTIFACTS / "dashboard-phone-dark.png"), full_page=True)
        await page.set_viewport_size({"width": 1280, "height": 1000})
        await page.reload()
        await page.wait_for_selector("body[data-loaded]")

        # The calls table, filtered by outcome and by user.
        await page.select_option("#calls-outcome", "bad_request")
        await expect(page.locator("#calls tr")).to_have_count(2)
        await page.select_option("#calls-outcome", "")
        await page.fill("#calls-user", "ana")
        await page.dispatch_event("#calls-user", "change")
        await expect(page.locator("#calls tr")).to_have_count(3)

        # English, then back: every word switches, the numbers stay.
        await page.click("#lang-en")
        english = await page.eval_on_selector_all("section h2", "els => els.map(e => e.textContent)")
        english_gauges = await page.eval_on_selector_all(".gauge", "els => els.map(e => e.textContent)")
        assert await page.text_content("#total-requests") == text["total-requests"]
        await page.click("#lang-es")

        # The range selector asks /stats/history for the range, and the chart's axis has its buckets.
        for button, bucket, buckets in (("#range-30d", "day", (30, 31)), ("#range-7d", "hour", (168, 169))):
            before = await page.get_attribute("body", "data-loaded")
            asked.clear()
            await page.click(button)
            await expect(page.locator("body")).not_to_have_attribute("data-loaded", before or "")
            history = [u for u in asked if "/stats/history" in u and "group_by" in u]
            assert history and f"bucket={bucket}" in history[-1]
            assert int(await page.get_attribute("#usage-chart", "data-buckets") or 0) in buckets
        await browser.close()
    assert problems == [] and external == []
    assert text["title"] == "Raymundo"
    assert text["total-requests"] == f"{stats['total_requests']:,}" == "8"
    assert text["errors"] == "1" and text["success-rate"] == stats["tasa_exito"]
    assert text["tokens-total"] == f"{stats['tokens']['total']:,}"
    assert text["cost"] == stats["costo_estimado_usd"]
    assert text["projection"] == f"${stats['detail']['cost_projection_month_usd']:.2f}"
    assert text["uptime"] == stats["uptime"]
    assert text["updated"] is not None and text["updated"].startswith("actualizado hace ")
    assert text["cache-hits"] == "1" and text["cache-tokens"] == f"{stats['cache']['saved_tokens']:,}" != "0"
    assert text["cache-share"] == f"{stats['cache']['hit_share'] * 100:.1f}%" == "12.5%"
    assert text["cache-rate"] == "50.0%"                 # 1 hit, 1 miss (the sampled bypass is not a lookup)
    assert all(n > 500 for n in inked.values()), inked   # every chart drew on its canvas
    assert dark_inked > 500 and light != dark
    assert phone_width <= 390
    assert int(total or 0) == stats["total_requests"]
    assert calls == 8
    # Words a person reads: the upstream's label, what the limit counts, the level's colour.
    by = {(scope, limit): (cls, words) for scope, limit, cls, words in gauges}
    cls, words = by[("upstream:gpt4o_cloud", "requests_per_day")]
    assert cls == "gauge amber" and words == "GPT-4o (cloud) · requests hoy4 / 5"
    assert by[("upstream:gpt4o_cloud", "requests_per_minute")][0] == "gauge green"
    budget = by[("nube", None)]
    assert budget[1].startswith("nube · presupuesto del día$0.0131")
    assert any(h.startswith("Últimas llamadas") for h in headings)
    assert any(h.startswith("Recent calls") for h in english) and "Latency over time" in english
    assert any(w.startswith("GPT-4o (cloud) · requests today") for w in english_gauges)
    assert stats["detail"]["refused"]["over_budget"] == 1


async def test_dashboard_login_form_and_wrong_token(guarded: Proxy) -> None:
    # unsafe=True: aiohttp's jar otherwise ignores cookies from an IP address like 127.0.0.1.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.post(guarded.url + "/dashboard/login", data={"token": "wrong"}, allow_redirects=False) as r:
            # Not the same blank form: it says the token was wrong.
            assert r.status == 401 and "Token incorrecto" in await r.text() and "tollgate_admin" not in r.cookies
        async with s.post(guarded.url + "/dashboard/login", data={"token": ADMIN}, allow_redirects=False) as r:
            assert r.status == 303 and "tollgate_admin" in r.cookies
            assert ADMIN not in r.headers.get("Set-Cookie", "")
        async with s.get(guarded.url + "/stats") as r:  # the cookie also opens the JSON it reads
            assert r.status == 200
    async with aiohttp.ClientSession() as s:
        async with s.get(guarded.url + "/stats") as r:
            assert r.status == 401


async def test_sessions_are_random_expire_and_end_at_logout(raw_config: dict[str, Any], clock: Clock,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TG_TEST_ADMIN", ADMIN)
    raw_config["server"].update(admin_token_env="TG_TEST_ADMIN", session_ttl_h=12)
    proxy = Proxy(raw_config, clock)
    await proxy.start()

    async def login() -> tuple[str, aiohttp.ClientSession]:
        s = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        async with s.post(proxy.url + "/dashboard/login", data={"token": ADMIN}, allow_redirects=False) as r:
            assert r.status == 303
            morsel = r.cookies["tollgate_admin"]
            assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
            assert not morsel["secure"]  # plain HTTP here; over TLS it is Secure
            assert int(morsel["max-age"]) == 12 * 3600
            return morsel.value, s

    try:
        first, s1 = await login()
        second, s2 = await login()
        # Random ids, nothing derived from the token: two logins, two sessions.
        assert first != second and ADMIN not in first and len(first) >= 32
        async with s1.get(proxy.url + "/stats") as r:
            assert r.status == 200
        # Logout ends that session, even for a copy of its cookie replayed later.
        async with s1.post(proxy.url + "/dashboard/logout", allow_redirects=False) as r:
            assert r.status == 303
        async with aiohttp.ClientSession(cookies={"tollgate_admin": first}) as replay:
            async with replay.get(proxy.url + "/stats") as r:
                assert r.status == 401
        async with s2.get(proxy.url + "/stats") as r:
            assert r.status == 200  # the other session lives on...
        clock.advance(12 * 3600 + 1)
        async with s2.get(proxy.url + "/stats") as r:
            assert r.status == 401  # ...until it expires
        await s1.close()
        await s2.close()
    finally:
        await proxy.stop()


async def test_recent_calls_are_paged_newest_first_and_filtered(guarded: Proxy, fake: FakeUpstream) -> None:
    await workload(guarded, fake)  # 2 cloud calls, 1 local, 1 bad request
    await guarded.settled()
    auth = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession(headers=auth) as s:
        async with s.get(guarded.url + "/stats/calls?limit=3") as r:
            first = await r.json()
        assert len(first["calls"]) == 3 and first["next"] is not None
        async with s.get(guarded.url + f"/stats/calls?limit=3&until={first['next']['until']}") as r:
            rest = await r.json()
        assert len(rest["calls"]) == 1 and rest["next"] is None
        times = [c["ts"] for c in first["calls"] + rest["calls"]]
        assert times == sorted(times, reverse=True) and len(set(times)) == 4
        assert set(first["calls"][0]) >= {"time", "upstream", "model", "type", "user", "prompt_tokens", "estimated",
                                          "latency_s", "outcome", "fallback_from"}
        assert not {"messages", "content", "text"} & set(first["calls"][0])   # never message text
        async with s.get(guarded.url + "/stats/calls?outcome=bad_request") as r:
            assert [c["outcome"] for c in (await r.json())["calls"]] == ["bad_request"]
        async with s.get(guarded.url + "/stats/calls?upstream=ollama_local") as r:
            assert [c["model"] for c in (await r.json())["calls"]] == ["llama3.2"]
        async with s.get(guarded.url + "/stats/calls?outcome=nada") as r:
            assert r.status == 400 and "outcome='nada'" in (await r.json())["error"]["message"]
    async with aiohttp.ClientSession() as s:
        async with s.get(guarded.url + "/stats/calls") as r:
            assert r.status == 401


async def test_chart_js_is_served_from_the_package_as_its_source_records(guarded: Proxy) -> None:
    import hashlib
    import re

    static = Path(__file__).resolve().parent.parent / "proxy" / "static"
    recorded = re.search(r"Chart\.js (\S+),.*SHA-256 `([0-9a-f]{64})`", (static / "SOURCE.md").read_text(), re.S)
    assert recorded is not None
    async with aiohttp.ClientSession() as s:
        async with s.get(guarded.url + "/dashboard/chart.js") as r:
            body = await r.read()
            assert r.status == 200 and r.content_type == "application/javascript"
    assert hashlib.sha256(body).hexdigest() == recorded.group(2)
    assert f"Chart.js v{recorded.group(1)}" in body[:200].decode()
    assert "MIT" in (static / "chart.js.LICENSE.md").read_text()


def test_a_charts_time_axis_has_every_local_hour_and_day_across_dst() -> None:
    """The axis the dashboard draws on: Madrid's spring-forward day has 23 hours, its autumn day
    25, and every day bucket starts at a local midnight."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from proxy.reports import starts

    madrid = ZoneInfo("Europe/Madrid")
    for day, after, hours in (((2024, 3, 31), (2024, 4, 1), 23), ((2024, 10, 27), (2024, 10, 28), 25),
                              ((2024, 6, 1), (2024, 6, 2), 24)):
        begin, end = (datetime(*d, tzinfo=madrid).timestamp() for d in (day, after))
        assert len(starts("hour", begin, end, madrid)) == hours
    month = starts("day", datetime(2024, 3, 1, tzinfo=madrid).timestamp(),
                   datetime(2024, 11, 1, tzinfo=madrid).timestamp(), madrid)
    assert len(month) == 245
    assert all(datetime.fromtimestamp(s, madrid).hour == 0 for s in month)
