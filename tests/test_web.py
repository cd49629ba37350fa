"""The built-in chat page at `/` of the server, driven in a real headless browser.

Debian's chromium and chromium-driver through Selenium; nothing downloads a browser. Where they
are missing the browser test is skipped with the reason, unless RWKVSTATE_REQUIRE_BROWSER=1
(set by .ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

import rwkvstate
from rwkvstate.cli import BUNDLED_MODEL
from rwkvstate.server import BackgroundServer, ServerConfig, create_app
from rwkvstate.server.web import STATIC_DIR

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
KEY = "web-test-key"
WAIT_S = 60


def _require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if not missing:
        return
    reason = f"the browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
    if os.environ.get("RWKVSTATE_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + "; RWKVSTATE_REQUIRE_BROWSER=1 says it must run here")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def model():
    return rwkvstate.Model.load(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    config = ServerConfig(api_key=KEY, state_dir=tmp_path_factory.mktemp("states"), slots=4)
    with BackgroundServer(create_app(model, config)) as running:
        yield running


@pytest.fixture
def browser(tmp_path):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def test_page_and_static_files_are_served_without_a_key(server):
    import httpx

    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    for name in ("app.js", "style.css"):
        static = httpx.get(f"{server.url}/static/{name}")
        assert static.status_code == 200 and static.text == (STATIC_DIR / name).read_text()
    assert httpx.get(server.url + "/v1/models").status_code == 401  # the API still needs the key
    assert not any(s in page.text + (STATIC_DIR / "app.js").read_text() for s in ("http://", "https://"))


# ---- the page in a browser ------------------------------------------------------------------


class Page:
    """The chat page's elements and the waits the test needs."""

    def __init__(self, driver):
        from selenium.webdriver.support.ui import WebDriverWait

        self.d = driver
        self.wait = WebDriverWait(driver, WAIT_S)

    def el(self, element_id):
        return self.d.find_element("id", element_id)

    def messages(self, role):
        return [e.get_attribute("textContent") for e in self.d.find_elements("css selector", f".msg.{role} .content")]

    def replies(self):
        return self.d.find_elements("css selector", ".msg.assistant")

    def idle(self):
        """Waits until no action is running (the Send button is enabled again)."""
        self.wait.until(lambda d: self.el("send").is_enabled())

    def fill(self, element_id, text):
        field = self.el(element_id)
        field.clear()
        field.send_keys(text)

    def send(self, text):
        self.fill("message", text)
        self.el("send").click()
        self.idle()
        self.assert_no_error()

    def click(self, element_id):
        self.el(element_id).click()
        self.idle()
        self.assert_no_error()

    def assert_no_error(self):
        error = self.el("error")
        assert not error.is_displayed(), error.text

    def state_tokens(self) -> int:
        self.wait.until(lambda d: "tokens in the state" in self.el("status").text)
        return int(self.el("status").get_attribute("data-tokens"))

    def conversations(self):
        return self.d.find_elements("css selector", "#conversations li")


def greedy_reply(model, messages: list[str], max_tokens: int) -> list[str]:
    """The replies the page must show: the same chat template and greedy sampling, in-process."""
    from rwkvstate.runtime.chat import ASSISTANT_STOP, format_user_turn, turn_break

    session = rwkvstate.Engine(model, slots=1).session()
    replies = []
    for text in messages:
        previous = model.tokenizer.decode_bytes(session.tokens[-4:]) if session.tokens else None
        prompt = turn_break(previous) + format_user_turn(text)
        stream = session.generate(max_tokens, rwkvstate.SamplingParams(temperature=0, stop=(ASSISTANT_STOP,)),
                                  prompt=prompt)  # fmt: skip
        replies.append("".join(stream).removeprefix(" "))
    return replies


def test_chat_page_streams_regenerates_undoes_forks_saves_and_loads(server, browser, model):
    page = Page(browser)
    browser.get(server.url + "/")
    # no key yet: the page says so clearly
    page.wait.until(lambda d: page.el("error").is_displayed())
    assert "Error 401" in page.el("error").text and "API key" in page.el("error").text
    page.fill("api-key", KEY)
    page.click("save-key")
    assert page.el("model").text == "stdlib-byte-l8-c256"

    page.el("settings").click()
    page.fill("temperature", "0")
    page.fill("max-tokens", "30")
    expected = greedy_reply(model, ["import os", "import sys"], 30)
    assert expected[0] and expected[1]  # the bundled model answers these two with text

    # a streamed reply: several chunks, usage and finish reason from the stream's end
    page.send("import os")
    reply = page.replies()[0]
    assert page.messages("assistant") == [expected[0]]
    assert int(reply.get_attribute("data-chunks")) > 1
    assert "30 tokens" in reply.text and "finish: length" in reply.text
    after_first = page.state_tokens()

    # regenerate: a one-turn rollback of the state and the same message again (greedy: same reply)
    page.click("regenerate")
    assert page.messages("user") == ["import os"] and page.messages("assistant") == [expected[0]]
    assert page.state_tokens() == after_first

    # undo a turn
    page.send("import sys")
    assert page.messages("assistant") == expected
    page.click("undo")
    assert page.messages("user") == ["import os"] and page.state_tokens() == after_first

    # fork: a second conversation with a copy of the state; the original is untouched by it
    page.click("fork")
    assert len(page.conversations()) == 2 and page.messages("user") == ["import os"]
    page.send("x = 1")
    forked_tokens = page.state_tokens()
    assert forked_tokens > after_first
    page.conversations()[0].click()
    page.idle()
    assert page.messages("user") == ["import os"]
    assert page.state_tokens() == after_first

    # save the original's state, load it as a new conversation, and continue it exactly
    page.click("save")
    assert "saved" in page.el("status").text
    saved = browser.find_elements("css selector", "#saved li")
    assert len(saved) == 1
    saved[0].click()
    assert page.el("load-name").get_attribute("value").startswith("snapshots/")
    page.click("load")
    assert len(page.conversations()) == 3
    assert page.state_tokens() == after_first
    assert page.messages("note")[0].startswith("loaded snapshots/")
    page.send("import sys")
    assert page.messages("assistant") == expected  # the restored first reply, then the same second one

    # the key was kept: a reload of the page finds the conversations and needs no key again
    browser.refresh()
    page.wait.until(lambda d: page.el("model").text == "stdlib-byte-l8-c256")
    page.idle()
    page.assert_no_error()
    assert len(page.conversations()) == 3
    problems = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert not problems, problems


def test_stop_ends_a_long_reply_and_the_chat_goes_on(browser, tmp_path):
    """Random weights write random bytes, so a reply runs until stopped; the session is
    released (the page retries while the server finishes the stopped request) and goes on.
    This server has no key: the page works without one."""
    from rwkvstate.model.synthetic import random_checkpoint, save_checkpoint

    from test_cli import BYTE_CFG

    path = save_checkpoint(random_checkpoint(BYTE_CFG, seed=5), tmp_path / "random.pth")
    with BackgroundServer(create_app(rwkvstate.Model.load(path), ServerConfig(slots=2))) as server:
        page = Page(browser)
        browser.get(server.url + "/")
        page.idle()
        page.assert_no_error()
        page.el("settings").click()
        page.fill("max-tokens", "4000")
        page.fill("message", "go on forever")
        page.el("send").click()
        page.wait.until(lambda d: page.replies() and int(page.replies()[0].get_attribute("data-chunks")) > 5)
        page.el("stop").click()
        page.idle()
        page.assert_no_error()
        assert "finish: stopped" in page.replies()[0].text
        stopped_at = page.state_tokens()
        assert stopped_at < 4000
        page.fill("max-tokens", "3")
        page.send("and now?")
        assert len(page.replies()) == 2 and page.state_tokens() > stopped_at
