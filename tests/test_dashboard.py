"""The dashboard, end to end in headless Chromium: loads offline, no console errors, right numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import async_playwright

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
    p = Proxy(raw_config)
    await p.start()
    yield p
    await p.stop()


async def test_dashboard_shows_what_stats_says(guarded: Proxy, fake: FakeUpstream, chromium: str) -> None:
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
        async with s.get(guarded.url + "/stats") as r:
            stats = await r.json()
    problems: list[str] = []
    external: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=FLAGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("request", lambda r: None if r.url.startswith(guarded.url) else external.append(r.url))
        # Without the token: the login form, not the numbers.
        response = await page.goto(guarded.url + "/dashboard")
        assert response is not None and response.status == 401
        assert await page.locator("input[name=token]").count() == 1
        problems.clear()  # the 401 itself is logged by the browser as a failed resource
        # The token once in the URL: it becomes a cookie and leaves the address bar.
        await page.goto(guarded.url + f"/dashboard?token={ADMIN}")
        assert page.url == guarded.url + "/dashboard"
        await page.wait_for_selector("body[data-loaded]")
        text = {i: await page.text_content(f"#{i}") for i in
                ("total-requests", "errors", "success-rate", "tokens-total", "cost", "projection", "uptime",
                 "cache-hits", "cache-share", "cache-tokens", "cache-rate")}
        assert await page.is_visible("#cache")
        gauges = await page.eval_on_selector_all(
            ".gauge", "els => els.map(e => [e.dataset.scope, e.dataset.limit, e.className])")
        bars = await page.eval_on_selector_all("#tokens-chart rect", "els => els.map(e => +e.dataset.tokens)")
        users = await page.eval_on_selector_all("#users td:first-child", "els => els.map(e => e.textContent)")
        legend = await page.eval_on_selector_all("#tokens-legend span", "els => els.map(e => e.textContent)")
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        await browser.close()
    assert problems == [] and external == []
    assert text["total-requests"] == f"{stats['total_requests']:,}" == "8"
    assert text["errors"] == "1" and text["success-rate"] == stats["tasa_exito"]
    assert text["tokens-total"] == f"{stats['tokens']['total']:,}"
    assert text["cost"] == stats["costo_estimado_usd"]
    assert text["projection"] == f"${stats['detail']['cost_projection_month_usd']:.2f}"
    assert text["uptime"] == stats["uptime"]
    assert text["cache-hits"] == "1" and text["cache-tokens"] == f"{stats['cache']['saved_tokens']:,}" != "0"
    assert text["cache-share"] == f"{stats['cache']['hit_share'] * 100:.1f}%" == "12.5%"
    assert text["cache-rate"] == "50.0%"                 # 1 hit, 1 miss (the sampled bypass is not a lookup)
    # 4 of the 5 daily requests used: amber (>= 70%); the minute's 4 of 10: green.
    classes = {(scope, limit): cls for scope, limit, cls in gauges}
    assert classes[("upstream:gpt4o_cloud", "requests_per_day")] == "gauge amber"
    assert classes[("upstream:gpt4o_cloud", "requests_per_minute")] == "gauge green"
    assert sum(bars) == stats["tokens"]["total"]
    assert legend == ["gpt4o_cloud", "ollama_local"]
    assert users == ["ana"]


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
