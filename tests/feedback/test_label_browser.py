"""A real browser (Debian's chromium, headless, driven by Playwright) runs the whole annotation flow:
an admin creates projects from jsonl uploads and two annotators; both annotators do comparisons, a
ranking (keyboard and drag) and ratings; the admin dashboard shows agreement; the export has them.
Screenshots of every page go to outputs/screenshots/."""

from __future__ import annotations

import json

import pytest

from conftest import ADMIN_PASSWORD, CHROMIUM_ARGS, SCREENSHOTS

XSS_RESPONSES = ['<script>window.__xss=1;alert("xss")</script>', '<img src=x onerror="window.__xss=2">']


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return str(path)


@pytest.fixture
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield b
        b.close()


def nav(page, action, *args, **kw):
    """Do something that submits a form and wait for the next page to load."""
    with page.expect_navigation():
        action(*args, **kw)


def shot(page, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_browser_end_to_end(browser, live_server_factory, tmp_path):
    srv = live_server_factory()
    base = srv.url
    compare = write_jsonl(tmp_path / "compare.jsonl", [
        {"id": "sea", "prompt": "Write a haiku about the sea.",
         "responses": ["Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time.", "The sea is big. It is wet."]},
        {"id": "xss", "prompt": "Show me <b>bold</b> and <script>alert(1)</script>", "responses": XSS_RESPONSES},
        {"id": "math", "prompt": "What is 17 * 3?", "responses": ["51", "17 * 3 is 41."]},
    ])
    rank = write_jsonl(tmp_path / "rank.jsonl", [
        {"id": "r1", "prompt": "Suggest a name for a black cat.", "responses": ["Shadow", "Cat", "Midnight", "Ink"]},
    ])
    rate = write_jsonl(tmp_path / "rate.jsonl", [
        {"id": "t1", "prompt": "Summarise: The meeting moved to Tuesday at 3pm.", "responses": ["Meeting now Tuesday 3pm.", "There was a meeting."]},
    ])
    dialogs: list[str] = []
    ctx = browser.new_context(viewport={"width": 1200, "height": 860})
    page = ctx.new_page()
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    # --- admin: log in, create three projects (jsonl upload) and two annotators
    page.goto(base + "/admin")
    assert "/login" in page.url
    shot(page, "01_login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", ADMIN_PASSWORD)
    nav(page, page.click, "button[type=submit]")
    assert page.url.endswith("/admin")
    for name, kind, path, guide in [
        ("haiku-compare", "compare", compare, "# How to judge\nPrefer the **more helpful** response. Ties are fine."),
        ("cat-rank", "rank", rank, "Rank from best to worst."),
        ("summary-rate", "rate", rate, "1 = useless, 5 = perfect."),
    ]:
        page.goto(base + "/admin")
        page.fill("#new-project input[name=name]", name)
        page.select_option("#new-project select[name=kind]", kind)
        page.fill("#new-project input[name=overlap]", "2")
        page.fill("#new-project textarea[name=guidelines]", guide)
        page.set_input_files("#new-project input[name=tasks]", path)
        nav(page, page.click, "#new-project button[type=submit]")
        assert "/admin/p/" in page.url and "items imported" in page.content()
    # a bad file is refused with its line numbers
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "responses": ["only one"]}\nnot json\n')
    page.set_input_files("#import input[name=tasks]", str(bad))
    nav(page, page.click, "#import button[type=submit]")
    assert "Nothing was imported" in page.content() and "invalid JSON" in page.content()
    shot(page, "09_import_rejected")
    for user in ("alice", "bob"):
        page.goto(base + "/admin")
        page.fill("#new-user input[name=username]", user)
        page.fill("#new-user input[name=password]", f"{user}-password")
        page.select_option("#new-user select[name=project_id]", label="haiku-compare")
        nav(page, page.click, "#new-user button[type=submit]")
    for pid in (2, 3):
        for user in ("alice", "bob"):
            page.goto(f"{base}/admin/p/{pid}")
            page.select_option("#add-member select[name=username]", user)
            nav(page, page.click, "#add-member button[type=submit]")
    page.goto(base + "/admin")
    shot(page, "06_admin")
    nav(page, page.click, "button:has-text('Log out')")

    # --- two annotators
    for user, key_rank in [("alice", True), ("bob", False)]:
        page.goto(base + "/")
        page.fill("input[name=username]", user)
        page.fill("input[name=password]", f"{user}-password")
        nav(page, page.click, "button[type=submit]")
        if user == "alice":
            shot(page, "02_home")
        # comparisons: by keyboard and by clicking; judge the *better* response by its content
        page.goto(base + "/p/1")
        for i in range(3):
            body = page.content()
            assert "Response 1" in body
            if "window.__xss" in body:  # the XSS item: shown as text, nothing ran
                assert page.locator("pre.text", has_text="<script>window.__xss=1").count() == 1
                assert page.locator("pre.text", has_text='<img src=x onerror="window.__xss=2">').count() == 1
                assert page.locator("main img").count() == 0 and page.locator("main script").count() == 0
                assert page.evaluate("window.__xss") is None
                if user == "alice":
                    shot(page, "03b_compare_xss")
            elif user == "alice" and i == 0:
                shot(page, "03_compare")
            texts = [page.locator(".response pre.text").nth(k).inner_text() for k in range(2)]
            good = next((k for k, t in enumerate(texts) if t.startswith(("Waves", "51"))), None)
            if good is not None:
                if i == 0:
                    nav(page, page.keyboard.press, str(good + 1))
                else:
                    page.fill("textarea[name=rationale]", "correct and <i>clear</i>")
                    page.select_option("select[name=reason]", "more accurate")
                    nav(page, page.click, f".response[data-side='{good + 1}'] button.choose")
            else:  # the XSS item: alice says tie, bob picks response 1 (they disagree here)
                nav(page, page.keyboard.press, "t" if user == "alice" else "1")
        assert "Nothing left for you here" in page.content()
        if user == "bob":
            shot(page, "08_done")

        # ranking: keyboard (Shift+arrows) for alice, drag and drop for bob; target order by content
        page.goto(base + "/p/2")
        want = ["Midnight", "Shadow", "Ink", "Cat"]
        items = page.locator("#rank-list .rankitem")
        assert items.count() == 4
        for target, label in enumerate(want):
            cur = [items.nth(k).locator("pre").inner_text() for k in range(4)]
            src = cur.index(label)
            if src == target:
                continue
            if key_rank:
                items.nth(src).focus()
                for _ in range(src - target):
                    page.keyboard.press("Shift+ArrowUp")
            else:
                items.nth(src).drag_to(items.nth(target), target_position={"x": 20, "y": 5})
        assert [items.nth(k).locator("pre").inner_text() for k in range(4)] == want
        if user == "alice":
            shot(page, "04_rank")
        nav(page, page.click, "#submit-ranking")
        assert "Nothing left for you here" in page.content()

        # ratings: keys 1-5
        page.goto(base + "/p/3")
        for _ in range(2):
            text = page.locator(".response pre.text").first.inner_text()
            if user == "alice" and text.startswith("Meeting"):
                shot(page, "05_rate")
            score = "5" if text.startswith("Meeting") else ("2" if user == "alice" else "1")
            nav(page, page.keyboard.press, score)
        assert "Nothing left for you here" in page.content()
        page.goto(base + "/")
        assert page.locator("td:has-text('nothing left')").count() == 3
        nav(page, page.click, "button:has-text('Log out')")

    # --- admin dashboard shows agreement
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", ADMIN_PASSWORD)
    nav(page, page.click, "button[type=submit]")
    page.goto(base + "/admin/p/1")
    alpha = page.locator("#agreement td.alpha").inner_text()
    assert alpha not in ("", "–")
    assert page.locator("#annotators tr", has_text="alice").count() == 1
    shot(page, "07_dashboard")
    page.goto(base + "/admin/p/2")
    assert page.locator("#agreement td.alpha").inner_text() == "1.000"  # both ranked the same
    shot(page, "07b_dashboard_rank")
    assert dialogs == []  # no payload ever ran
    ctx.close()

    # --- export with the CLI (same database file, server still running)
    from tether.feedback.cli import main

    out = {}
    for pid, name in [(1, "haiku-compare"), (2, "cat-rank"), (3, "summary-rate")]:
        path = tmp_path / f"{name}.jsonl"
        assert main(["export", "--db", srv.db_url, "--project", name, "--out", str(path), "--raw", str(tmp_path / f"{name}.raw.jsonl")]) == 0
        out[name] = [json.loads(x) for x in path.read_text().splitlines()]
    pairs = {(r["chosen"], r["rejected"]) for r in out["haiku-compare"]}
    assert pairs == {(compare_resp(0, 0), compare_resp(0, 1)), ("51", "17 * 3 is 41.")}
    assert {(r["chosen"], r["rejected"]) for r in out["cat-rank"]} == {
        (want[a], want[b]) for a in range(4) for b in range(a + 1, 4)}
    assert [(r["chosen"], r["rejected"]) for r in out["summary-rate"]] == [("Meeting now Tuesday 3pm.", "There was a meeting.")]
    raw = [json.loads(x) for x in (tmp_path / "haiku-compare.raw.jsonl").read_text().splitlines()]
    assert len(raw) == 6 and any(r["rationale"] == "correct and <i>clear</i>" for r in raw)
    assert {r["annotator"] for r in raw} == {"alice", "bob"}


def compare_resp(i, j):
    return ["Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time.", "The sea is big. It is wet."][j]
