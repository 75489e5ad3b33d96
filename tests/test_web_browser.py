"""The page in a real browser (Debian's chromium driven by Playwright) over the real services:
type a query, see thumbnails, page on, click a photo, upload one, get a clear error. Screenshots go
to .cache/web-screenshots/ for a person to look at."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.conftest import REPO

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / ".cache" / "web-screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
WAIT_MS = 60_000  # an upper bound for readiness on a loaded 2-core machine, never a pause


@pytest.fixture(scope="module")
def page(web) -> Page:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium (apt-get install chromium)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.set_default_timeout(WAIT_MS)
        expect.set_options(timeout=WAIT_MS)
        yield page
        browser.close()


def loaded_thumbnails(page: Page, at_least: int) -> None:
    """Wait until the grid holds `at_least` cards whose thumbnails have loaded (decoded, non-empty)."""
    page.wait_for_function("""(n) => {
        const images = [...document.querySelectorAll('#grid .card img')];
        return images.length >= n && images.every((i) => i.complete && i.naturalWidth > 0);
    }""", arg=at_least)


def labels(page: Page) -> Counter:
    return Counter(page.locator("#grid .card .label").all_inner_texts())


def test_type_a_query_page_on_and_click_a_photo(page, web):
    page.goto(web.url + "/")
    page.fill("#q", "dog")
    page.press("#q", "Enter")
    expect(page).to_have_url(re.compile(r"/\?q=dog$"))
    loaded_thumbnails(page, 24)
    assert page.locator("#grid .card").count() == 24
    assert labels(page)["dog"] >= 18, labels(page)
    expect(page.locator("#status")).to_contain_text("24 photos for “dog”")
    expect(page.locator("#query")).to_be_hidden()  # no photo was given
    expect(page.locator("#token-form")).to_be_hidden()  # nor asked for: this gateway needs no token
    page.screenshot(path=SCREENSHOTS / "search.png")

    first_ids = page.locator("#grid .card").evaluate_all("(cards) => cards.map((c) => c.dataset.id)")
    page.click("#more")
    loaded_thumbnails(page, 48)
    ids = page.locator("#grid .card").evaluate_all("(cards) => cards.map((c) => c.dataset.id)")
    assert len(ids) == 48 and ids[:24] == first_ids and len(set(ids)) == 48

    clicked = page.locator("#grid .card").nth(3)
    clicked_id = clicked.get_attribute("data-id")
    clicked.click()
    expect(page.locator("#query-title")).to_contain_text(f"Photos like {clicked_id}")
    expect(page.locator("#status")).to_contain_text(f"photos like {clicked_id}")
    loaded_thumbnails(page, 24)
    ids = page.locator("#grid .card").evaluate_all("(cards) => cards.map((c) => c.dataset.id)")
    assert clicked_id not in ids and labels(page)["dog"] >= 12, labels(page)
    assert "similar=" in page.url
    page.screenshot(path=SCREENSHOTS / "similar.png")


def test_upload_a_photo_and_see_its_tags(page, web, cifar):
    ship = sorted((cifar / "test" / "ship").iterdir())[0]
    page.goto(web.url + "/")
    page.set_input_files("#upload", str(ship))
    expect(page.locator("#query-title")).to_contain_text(f"Tags for {ship.name}")
    expect(page.locator("#tags .chip")).to_have_count(8)
    assert "ship" in page.locator("#tags .chip .word").all_inner_texts()
    loaded_thumbnails(page, 24)
    assert labels(page)["ship"] >= 12, labels(page)
    page.screenshot(path=SCREENSHOTS / "upload.png")


def test_an_unknown_word_gets_a_clear_message(page, web):
    page.goto(web.url + "/")
    page.fill("#q", "cat blorfwumpus")
    page.press("#q", "Enter")
    message = page.locator("#message")
    expect(message).to_be_visible()
    expect(message).to_contain_text("blorfwumpus")
    expect(message).to_contain_text("NOT_FOUND")
    expect(page.locator("#token-form")).to_be_hidden()
    assert page.locator("#grid .card").count() == 0
    page.screenshot(path=SCREENSHOTS / "unknown-word.png")


def test_a_shared_url_shows_its_results_and_similar_words(page, web):
    page.goto(web.url + "/?q=cat+sofa&k=12&word=ocean")
    loaded_thumbnails(page, 12)
    assert page.locator("#grid .card").count() == 12 and labels(page)["cat"] >= 6, labels(page)
    expect(page.locator("#q")).to_have_value("cat sofa")
    expect(page.locator("#word-list .chip")).to_have_count(12)
    words = page.locator("#word-list .chip .word").all_inner_texts()
    assert {"sea", "waters"} & set(words), words
    page.screenshot(path=SCREENSHOTS / "shared-url.png", full_page=True)


def test_words_added_to_a_photo_and_explanations(page, web):
    page.goto(web.url + "/?similar=ship/0000.jpg&k=8")
    expect(page.locator("#like-form")).to_be_visible()
    page.check("#explain")
    page.fill("#like-words", "water")
    page.press("#like-words", "Enter")
    expect(page).to_have_url(re.compile(r"/\?q=water&like=ship%2F0000\.jpg&k=8&explain=1$"))
    expect(page.locator("#query-title")).to_contain_text("Photos like ship/0000.jpg + water")
    loaded_thumbnails(page, 8)
    why = page.locator("#grid .card .why").all_inner_texts()
    assert len(why) == 8 and all("water +" in w and "img:ship/0000.jpg" in w and "words:" in w for w in why), why
    page.screenshot(path=SCREENSHOTS / "photo-and-words.png")


def test_filter_by_a_label_in_the_url_and_page_on(page, web):
    """Filters on the page: a label keeps only its photos (page after page), goes into the URL and the API
    calls, and a date range outside every photo's time shows none."""
    frogs = page.request.get(web.url + "/api/search?q=dog&k=1000&label=frog").json()["results"]
    shown = min(24, len(frogs))
    page.goto(web.url + "/")
    page.fill("#q", "dog")
    page.fill("#f-label", "frog")
    page.press("#q", "Enter")
    expect(page).to_have_url(re.compile(r"/\?q=dog&label=frog$"))
    loaded_thumbnails(page, shown)
    assert page.locator("#grid .card").count() == shown and set(labels(page)) == {"frog"}, labels(page)
    expect(page.locator("#status")).to_contain_text(f"{shown} photos for “dog” (label frog)")
    page.screenshot(path=SCREENSHOTS / "filter-label.png")
    if len(frogs) > 24:  # More follows the page token: the next frogs, none twice
        page.click("#more")
        loaded_thumbnails(page, min(48, len(frogs)))
        ids = page.locator("#grid .card").evaluate_all("(cards) => cards.map((c) => c.dataset.id)")
        assert ids == [hit["id"] for hit in frogs[:48]] and set(labels(page)) == {"frog"}

    page.goto(web.url + "/?q=dog&label=frog&after=2999-01-01")  # a shared URL fills the filters in
    expect(page.locator("#f-label")).to_have_value("frog")
    expect(page.locator("#f-after")).to_have_value("2999-01-01")
    expect(page.locator("#status")).to_contain_text("No photos for “dog” (label frog, taken on or after 2999-01-01)")
    assert page.locator("#grid .card").count() == 0

    page.click("#clear-filters")  # the same search again, unfiltered
    loaded_thumbnails(page, 24)
    expect(page).to_have_url(re.compile(r"/\?q=dog$"))
    assert labels(page)["frog"] < 24
