"""The web page end to end: the real server (search_server.py) over a real
indexed folder, driven in a real headless Chromium by Playwright. The page's
results are checked against the API's JSON for the same query, so a page that
draws something else (or nothing) fails.

Chromium and Playwright are required: without them these tests fail, they
don't skip. Nothing leaves 127.0.0.1: every other request is aborted and
recorded as a problem."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import shutil
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from conftest import REPO, run_command
from served import ICONS, index_icons, running_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--no-proxy-server"]
QUERY = REPO / "search.jpg"  # the demo query: not in the collection
SCREENSHOT = REPO / "docs" / "web_page.png"
AWKWARD = '<img src=x onerror=alert(1)> & "q".png'  # a file name that is also markup
PAGE_COUNT = 10  # the page's default number of results
WAIT_MS = 30_000

expect.set_options(timeout=WAIT_MS)
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- the collection, the server, the browser -----------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """60 demo icons indexed by the real command, then one renamed to a name
    that is markup and one byte-identical copy added (re-indexed: no model
    call, both are known contents), served by the real server."""
    folder = tmp_path_factory.mktemp("web")
    features = index_icons(folder, 60)
    (folder / "icons" / ICONS[1].name).rename(folder / "icons" / AWKWARD)
    shutil.copy(folder / "icons" / ICONS[0].name, folder / "icons" / f"copy of {ICONS[0].name}")
    result = run_command("create_imagenet_features.py", "--dataset", "icons", "--output", features.name,
                         "--model", "efficientnet_lite0", "-q", cwd=folder)
    assert result.returncode == 0, result.stderr
    with running_server(features, cwd=folder) as running:
        running.wait_for_model()  # uploads then never wait for the model build
        yield running
    logged = "".join(running.stderr)
    assert "error" not in logged.lower() and "Traceback" not in logged, logged  # nothing the page did broke it


@pytest.fixture(scope="module")
def ids(server) -> dict[str, int]:
    """Every indexed path -> its row id."""
    status, rows = api_get(server, "api/sample?n=100&seed=0")
    assert status == 200 and len(rows) == 61, rows
    return {row["path"]: row["id"] for row in rows}


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is needed for the web page tests"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Ui:
    """One page of the app in its own browser context, recording console
    errors, uncaught exceptions, CSP violations, dialogs and off-host requests."""

    def __init__(self, browser, server, width=1280, height=900):
        self.server = server
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.route("**/*", self._only_the_server)
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.console_errors: list[str] = []
        self.problems: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        self.page.on("dialog", lambda dialog: (self.problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
        # securitypolicyviolation events, gathered from the first moment of each document
        self.page.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation',"
                                  " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")

    def _only_the_server(self, route):
        if route.request.url.startswith(self.server.url):
            route.continue_()
        else:
            self.problems.append(f"request outside the server: {route.request.url}")
            route.abort()

    def goto(self, query: str = ""):
        return self.page.goto(self.server.url + query)

    def locator(self, testid: str):
        return self.page.get_by_test_id(testid)

    def search_number(self) -> str | None:
        return self.page.get_attribute("[data-testid=results]", "data-search")

    def wait_results(self, query_id=None, after=None):
        """Until a search is drawn and none runs: by `query_id` (None: an
        upload), after the drawing numbered `after` if given."""
        self.page.wait_for_function(
            """([queryId, after]) => {
                const grid = document.querySelector('[data-testid=results]');
                return grid && grid.dataset.search && grid.dataset.search !== after
                    && grid.dataset.queryId === queryId && !document.body.classList.contains('busy');
            }""", arg=["" if query_id is None else str(query_id), after])
        return self.results()

    def results(self) -> list[dict]:
        return self.page.eval_on_selector_all("[data-testid=result]", """tiles => tiles.map(tile => ({
            id: Number(tile.dataset.id), distance: tile.dataset.distance,
            rank: tile.querySelector('.rank').textContent, shown: tile.querySelector('.distance').textContent,
            path: tile.querySelector('.path').textContent, alt: tile.querySelector('img').alt,
            copies: tile.querySelector('.copies')?.textContent ?? null,
            copiesTitle: tile.querySelector('.copies')?.title ?? null,
            visible: tile.offsetParent !== null}))""")

    def url_params(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.page.url).query)

    def assert_clean(self):
        assert self.problems == []
        assert self.console_errors == []
        assert self.page.evaluate("window.__csp") == []


@pytest.fixture
def ui(browser, server):
    page = Ui(browser, server)
    yield page
    page.context.close()


# -- the API, asked directly ---------------------------------------------------


def api_get(server, path: str) -> tuple[int, dict]:
    try:
        with NO_PROXY.open(server.url + path, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def api_upload(server, file: Path, n=PAGE_COUNT, metric="chi2") -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{file.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + file.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{server.url}api/search?n={n}&metric={metric}", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with NO_PROXY.open(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def api_results(server, query_id=None, n=PAGE_COUNT, metric="chi2") -> dict:
    if query_id is None:
        status, found = api_upload(server, QUERY, n, metric)
    else:
        status, found = api_get(server, f"api/search?id={query_id}&n={n}&metric={metric}")
    assert status == 200, found
    return found


def assert_same(shown: list[dict], found: dict) -> None:
    """The page's tiles are the API's results: ids, exact distances, and what they say."""
    assert [(t["id"], float(t["distance"])) for t in shown] == [(h["id"], h["distance"]) for h in found["results"]]
    for tile, hit in zip(shown, found["results"]):
        assert tile["rank"] == f"#{hit['rank']}"
        assert tile["shown"] == f"{hit['distance']:.4f}"  # as the CLI prints it
        assert tile["path"] == tile["alt"] == hit["path"]
        assert tile["visible"]


# -- the tests ---------------------------------------------------------------------


def test_the_page_loads_clean_and_shows_a_sample(ui, server, ids):
    response = ui.goto()
    assert "script-src 'self'" in response.headers["content-security-policy"]  # the policy the page must pass
    tiles = ui.locator("sample-tile")
    expect(tiles).to_have_count(24)
    paths = {row: path for path, row in ids.items()}
    for tile in tiles.all():
        assert tile.locator("img").get_attribute("alt") == paths[int(tile.get_attribute("data-id"))]
    ui.page.wait_for_function("() => [...document.querySelectorAll('[data-testid=sample] img')]"
                              ".every(img => img.complete && img.naturalWidth > 0)")  # thumbnails were served
    expect(ui.locator("stats")).to_have_text("61 images · model efficientnet_lite0")
    _, stats = api_get(server, "api/stats")
    options = ui.locator("metric").locator("option")
    assert options.evaluate_all("os => os.map(o => o.value)") == stats["modes"]
    expect(ui.locator("metric")).to_have_value(stats["default_mode"])
    expect(ui.locator("count")).to_have_value(str(PAGE_COUNT))
    expect(ui.locator("results")).to_be_hidden()
    expect(ui.locator("error")).to_be_hidden()
    ui.assert_clean()

    # The watchers do see a violation: an inline <style> is one.
    ui.page.evaluate("document.head.append(Object.assign(document.createElement('style'), {textContent: 'p{}'}))")
    ui.page.wait_for_function("() => window.__csp.length > 0")
    assert any("Content Security Policy" in text for text in ui.console_errors), ui.console_errors


def test_an_uploaded_image_shows_the_apis_results(ui, server):
    ui.goto()
    ui.locator("file-input").set_input_files(QUERY)
    shown = ui.wait_results()
    assert_same(shown, api_results(server))
    preview = ui.locator("query-preview")
    assert preview.get_attribute("src").startswith("blob:")
    ui.page.wait_for_function("() => document.querySelector('[data-testid=query-preview]').naturalWidth > 0")
    expect(ui.locator("query-name")).to_have_text("search.jpg")
    expect(ui.locator("status")).to_contain_text("10 images nearest to search.jpg (chi2)")
    expect(ui.locator("sample")).to_be_hidden()
    assert "id" not in ui.url_params()  # an upload has no URL of its own
    ui.assert_clean()


DROP = """([name, data]) => {
    const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
    const files = new DataTransfer();
    files.items.add(new File([bytes], name, {type: 'image/jpeg'}));
    const over = new DragEvent('dragover', {bubbles: true, cancelable: true, dataTransfer: files});
    const overTaken = !document.querySelector('main').dispatchEvent(over);
    const highlighted = document.body.classList.contains('dragging');
    const drop = new DragEvent('drop', {bubbles: true, cancelable: true, dataTransfer: files});
    const dropTaken = !document.querySelector('main').dispatchEvent(drop);
    return [overTaken, highlighted, dropTaken, document.body.classList.contains('dragging')];
}"""
PASTE = """([name, data]) => {
    const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
    const clipboard = new DataTransfer();
    clipboard.items.add(new File([bytes], name, {type: 'image/jpeg'}));
    return !document.body.dispatchEvent(new ClipboardEvent('paste',
        {bubbles: true, cancelable: true, clipboardData: clipboard}));
}"""


def test_a_dropped_image_is_searched(ui, server):
    ui.goto()
    expect(ui.locator("sample-tile")).to_have_count(24)
    over, highlighted, drop, still_highlighted = ui.page.evaluate(
        DROP, ["dropped.jpg", base64.b64encode(QUERY.read_bytes()).decode()])
    assert over and drop  # dragover accepted the file; drop kept the browser from opening it
    assert highlighted and not still_highlighted
    assert_same(ui.wait_results(), api_results(server))
    expect(ui.locator("query-name")).to_have_text("dropped.jpg")
    ui.assert_clean()


def test_a_pasted_image_is_searched(ui, server):
    ui.goto()
    expect(ui.locator("sample-tile")).to_have_count(24)
    taken = ui.page.evaluate(PASTE, ["image.jpg", base64.b64encode(QUERY.read_bytes()).decode()])
    assert taken  # the page took the paste
    assert_same(ui.wait_results(), api_results(server))
    expect(ui.locator("query-name")).to_have_text("image.jpg")
    ui.assert_clean()


def test_a_search_is_a_url_to_share_reload_and_go_back_to(ui, server):
    ui.goto()
    first = ui.locator("sample-tile").first
    a = int(first.get_attribute("data-id"))
    first.click()
    assert_same(ui.wait_results(a), api_results(server, a))
    assert ui.url_params() == {"id": [str(a)], "n": [str(PAGE_COUNT)], "metric": ["chi2"]}
    expect(ui.locator("query-original")).to_have_attribute("href", f"/api/images/{a}")
    ui.page.evaluate("window.__samePage = true")  # back/forward below stay in this document

    # A result reached by keyboard, like a click.
    second = ui.locator("result").nth(1)
    b = int(second.get_attribute("data-id"))
    assert b != a
    second.focus()
    ui.page.keyboard.press("Enter")
    assert_same(ui.wait_results(b), api_results(server, b))
    assert ui.url_params() == {"id": [str(b)], "n": [str(PAGE_COUNT)], "metric": ["chi2"]}
    expect(ui.locator("query-name")).to_have_text(api_results(server, b)["query"])

    ui.page.go_back()
    assert_same(ui.wait_results(a), api_results(server, a))
    assert ui.url_params()["id"] == [str(a)]
    ui.page.go_forward()
    assert_same(ui.wait_results(b), api_results(server, b))
    assert ui.page.evaluate("window.__samePage") is True

    ui.page.reload()  # the URL alone gives the same page
    assert_same(ui.wait_results(b), api_results(server, b))
    ui.page.go_back()
    assert_same(ui.wait_results(a), api_results(server, a))
    ui.page.go_back()  # the page as it opened: the sample, no results
    expect(ui.locator("sample")).to_be_visible()
    expect(ui.locator("results")).to_be_hidden()
    ui.assert_clean()


def test_mode_and_count_rerun_the_search(ui, server, ids):
    query = ids["icons/abiword.png"]
    ui.goto(f"?id={query}&n=5&metric=chi2")
    assert_same(ui.wait_results(query), api_results(server, query, 5))
    expect(ui.locator("count")).to_have_value("5")

    before = ui.search_number()
    ui.locator("metric").select_option("cosine")
    shown = ui.wait_results(query, after=before)
    assert_same(shown, api_results(server, query, 5, "cosine"))
    assert ui.url_params() == {"id": [str(query)], "n": ["5"], "metric": ["cosine"]}
    assert api_results(server, query, 5, "cosine") != api_results(server, query, 5, "chi2")  # the check can tell

    before = ui.search_number()
    ui.locator("count").fill("3")
    ui.locator("count").press("Enter")
    shown = ui.wait_results(query, after=before)
    assert len(shown) == 3
    assert_same(shown, api_results(server, query, 3, "cosine"))
    assert ui.url_params() == {"id": [str(query)], "n": ["3"], "metric": ["cosine"]}

    # An uploaded query is re-run too, with the file kept in the page.
    ui.locator("file-input").set_input_files(QUERY)
    ui.wait_results()
    before = ui.search_number()
    ui.locator("count").fill("7")
    ui.locator("count").blur()
    shown = ui.wait_results(after=before)
    assert_same(shown, api_results(server, None, 7, "cosine"))
    assert ui.url_params() == {"n": ["7"], "metric": ["cosine"]}
    ui.assert_clean()


def test_a_search_shows_its_loading_state(ui, server):
    ui.goto()
    expect(ui.locator("sample-tile")).to_have_count(24)
    during = []

    def look_while_in_flight(route):  # the request is held here: the page is waiting for it
        during.append(ui.page.evaluate("[document.body.classList.contains('busy'),"
                                       " document.querySelector('main').getAttribute('aria-busy'),"
                                       " document.querySelector('[data-testid=status]').textContent]"))
        route.continue_()

    ui.page.route("**/api/search*", look_while_in_flight)
    ui.locator("file-input").set_input_files(QUERY)
    ui.wait_results()
    assert during == [[True, "true", "Searching…"]]
    expect(ui.page.locator("main")).to_have_attribute("aria-busy", "false")
    ui.assert_clean()


def test_api_errors_are_shown(ui, server, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    status, refused = api_upload(server, text)
    assert status == 415
    ui.goto()
    ui.locator("file-input").set_input_files(text)
    alert = ui.page.get_by_role("alert")
    expect(alert).to_have_text(refused["error"])
    expect(alert).to_have_attribute("data-testid", "error")
    expect(ui.locator("results")).to_be_hidden()
    expect(ui.locator("status")).to_have_text("")

    # A good search clears it; a URL naming no image gets the API's 404 message.
    ui.locator("file-input").set_input_files(QUERY)
    ui.wait_results()
    expect(alert).to_be_hidden()
    status, missing = api_get(server, "api/search?id=999999&n=10&metric=chi2")
    assert status == 404
    ui.goto("?id=999999&n=10&metric=chi2")
    expect(alert).to_have_text(missing["error"])
    assert ui.problems == [] and ui.page.evaluate("window.__csp") == []
    assert all("status of 415" in e or "status of 404" in e for e in ui.console_errors), ui.console_errors


def test_names_are_shown_as_text_and_copies_are_counted(ui, server, ids):
    odd = ids[f"icons/{AWKWARD}"]
    ui.goto(f"?id={odd}&n=3")
    shown = ui.wait_results(odd)
    assert_same(shown, api_results(server, odd, 3))
    assert shown[0]["path"] == f"icons/{AWKWARD}"
    expect(ui.locator("query-name")).to_have_text(f"icons/{AWKWARD}")
    expect(ui.page.locator("img[src=x]")).to_have_count(0)  # the name never became markup

    original = ids[f"icons/{ICONS[0].name}"]
    ui.goto(f"?id={original}&n=3")
    shown = ui.wait_results(original)
    found = api_results(server, original, 3)
    assert_same(shown, found)
    assert len(found["results"][0]["copies"]) == 1  # the copy made above is one image with it
    assert shown[0]["copies"] == "+1 copy"
    assert shown[0]["copiesTitle"] == found["results"][0]["copies"][0]
    assert [t["copies"] for t in shown[1:]] == [None, None]
    ui.assert_clean()


def test_phone_width(browser, server):
    ui = Ui(browser, server, 375, 740)
    try:
        ui.goto()
        expect(ui.locator("sample-tile")).to_have_count(24)
        assert ui.page.evaluate("document.documentElement.scrollWidth") <= 375
        boxes = [ui.locator(name).bounding_box() for name in ("file-input", "metric", "count")]
        for upper, lower in itertools.pairwise(boxes):  # one column: each control under the one before
            assert lower["y"] >= upper["y"] + upper["height"]
        ui.locator("file-input").set_input_files(QUERY)
        shown = ui.wait_results()
        assert_same(shown, api_results(server))
        assert ui.page.evaluate("document.documentElement.scrollWidth") <= 375
        expect(ui.locator("result").first).to_be_in_viewport()
        lefts = ui.locator("result").evaluate_all("tiles => tiles.map(t => Math.round(t.getBoundingClientRect().left))")
        assert len(set(lefts)) == 2  # two columns
        ui.assert_clean()
    finally:
        ui.context.close()


def test_screenshot(ui, server):
    ui.goto()
    ui.locator("file-input").set_input_files(QUERY)
    ui.wait_results()
    ui.page.wait_for_function("() => [...document.images].filter(img => img.offsetParent !== null)"
                              ".every(img => img.complete && img.naturalWidth > 0)")
    png = ui.page.screenshot()
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.size == (1280, 900)
    colours = picture.convert("RGB").getcolors(maxcolors=1 << 24)
    assert len(colours) > 2000, len(colours)  # the thumbnails are there, not a blank page
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOT.write_bytes(png)
    ui.assert_clean()
