"""The app in a real browser: type a message, see two answers, vote, find the vote stored.

The handler tests (test_ui.py) call the Python functions directly; this one goes
through everything a person's vote goes through: the Gradio page and its
JavaScript, the queue, the event wiring in ``build_demo``, the session state
kept per browser tab, and the database. It catches what the handler tests
cannot: a component wired to the wrong input, a button that never becomes
enabled, a notice that never shows.

Headless Chromium comes from Debian's ``chromium`` package (``make test``
installs it through scripts/browser.sh when it can), driven by Playwright for
Python. Playwright's own browser download is never used: these machines reach
the package registries only. Where Chromium or Playwright is missing, the test
skips and says how to get them. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from sqlalchemy import select

from rlhf_chat.runtime import start_services
from rlhf_chat.serving.ui import build_demo, launch_options
from rlhf_chat.storage import store
from rlhf_chat.storage.tables import Message

CHROMIUM = Path("/usr/bin/chromium")
# --headless and --disable-gpu: no display, no GPU. --no-sandbox: CI runs as root,
# where Chromium's sandbox refuses to start. The background-networking flags keep
# Chromium from dialling out on its own (updates, sync, QUIC probes): on machines
# with no outside network those attempts made it refuse connections altogether.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "bench" / "out"  # git-ignored
WAIT_MS = 60_000  # generous: two cores, a model worker, a browser and pytest share them
MESSAGE = "What is a good breakfast?"


def free_port() -> int:
    """A port nobody listens on now (the OS picks it), so parallel runs never clash."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_text(a: str, b: str) -> bool:
    """Equal up to line endings: a textarea's value turns \\r\\n and \\r into \\n,
    and a random tiny model can sample a carriage return."""
    def norm(text: str) -> str:
        return text.replace("\r\n", "\n").replace("\r", "\n")

    return norm(a) == norm(b)


@pytest.fixture
def sync_playwright():
    """Playwright's sync API, or a skip that says how to get it."""
    api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python is not installed (pip install -r requirements-dev.txt)"
    )
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: run `make test` as root on Debian (it installs the chromium package), "
            "or `apt-get install chromium`"
        )
    return api


@pytest.fixture
def served_app(tiny_config):
    """The real app on the tiny model, served on loopback: (services, url).

    Built as app.py builds it (start_services, build_demo, launch), but without
    the training loop, whose rounds would only compete with the page for the CPU.
    """
    services = start_services(tiny_config, train=False)
    demo = None
    try:
        assert services.worker.ready.wait(120), f"the model did not load: {services.worker.load_error}"
        port = free_port()
        demo = build_demo(services)
        demo.launch(
            server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False,
            **launch_options(tiny_config),
        )
        yield services, f"http://127.0.0.1:{port}/"
    finally:
        if demo is not None:
            demo.close()
        services.stop()


def test_vote_in_the_browser_is_stored(served_app, sync_playwright):
    services, url = served_app
    expect = sync_playwright.expect
    with sync_playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.set_default_timeout(WAIT_MS)
            page.goto(url, wait_until="domcontentloaded")

            box = page.get_by_label("Your message")
            box.fill(MESSAGE)
            box.press("Enter")

            pane_a, pane_b = page.get_by_label("Response A"), page.get_by_label("Response B")
            a_is_better = page.get_by_role("button", name="A is better")
            # The panes stream text while the buttons stay disabled; the buttons come
            # on only when both answers are complete and stored.
            expect(a_is_better).to_be_enabled()
            expect(pane_a).not_to_have_value("")
            expect(pane_b).not_to_have_value("")
            shown = (pane_a.input_value(), pane_b.input_value())
            # At 12 tokens the tiny model's answers are cut off, and the panes say so.
            expect(page.get_by_label("Response A (cut off)")).to_be_visible()
            expect(page.get_by_label("Response B (cut off)")).to_be_visible()
            more = page.get_by_role("button", name="Continue", exact=True)
            expect(more).to_be_disabled()

            a_is_better.click()
            expect(page.get_by_text("Recorded", exact=False)).to_be_visible()
            # The chosen answer continues the conversation and the box is open again.
            expect(a_is_better).to_be_disabled()
            expect(box).to_be_editable()
            # ... marked as cut off, and Continue writes on into the conversation.
            expect(page.get_by_text("(cut off: press Continue to read on)", exact=True)).to_be_visible()
            expect(more).to_be_enabled()
            more.click()
            expect(page.get_by_text("Done.", exact=False).or_(page.get_by_text("Cut off again", exact=False))).to_be_visible()

            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "browser_vote.png"), full_page=True)
        finally:
            browser.close()

    # The vote handler commits before it returns, so "Recorded" on screen means stored.
    with services.sessions() as session:
        voted = store.voted_comparisons(session)
        assert len(voted) == 1, voted
        row = voted[0]
        assert row.choice == "a"
        assert row.context[-1] == {"role": "user", "content": MESSAGE}
        assert same_text(row.response_a, shown[0]), (row.response_a, shown[0])
        assert same_text(row.response_b, shown[1]), (row.response_b, shown[1])
        assert store.count_votes(session) == 1
        answer = session.scalars(select(Message).where(Message.role == "assistant")).one()
        assert answer.content.startswith(row.response_a) and len(answer.content) > len(row.response_a)


def test_a_written_answer_in_the_browser_continues_the_conversation_and_is_exported(served_app, sync_playwright, tmp_path):
    from rlhf_chat.serving.controls import export_feedback

    services, url = served_app
    expect = sync_playwright.expect
    mine = "Steep green tea at 80 degrees for two minutes. Do you like it strong?"
    with sync_playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.set_default_timeout(WAIT_MS)
            page.goto(url, wait_until="domcontentloaded")
            box = page.get_by_label("Your message")
            box.fill(MESSAGE)
            box.press("Enter")
            expect(page.get_by_role("button", name="A is better")).to_be_enabled()
            shown_b = page.get_by_label("Response B", exact=False).input_value()

            page.get_by_text("Neither is what you wanted? Write a better answer").click()
            page.get_by_role("button", name="Edit answer B").click()
            written = page.get_by_label("Your answer")
            expect(written).to_have_value(shown_b)  # prefilled with the answer to edit
            written.fill(mine)
            page.get_by_role("button", name="Submit my answer").click()
            expect(page.get_by_text("Recorded: your answer", exact=False)).to_be_visible()
            expect(written).to_have_value("")
            expect(page.get_by_text(mine, exact=True)).to_be_visible()  # in the conversation
            expect(box).to_be_editable()
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "browser_written_answer.png"), full_page=True)
        finally:
            browser.close()

    with services.sessions() as session:
        (demo,) = store.demonstrations(session)
        assert (demo.text, demo.started_from) == (mine, "b") and same_text(demo.comparison.response_b, shown_b)
    (prefs, sft), _ = export_feedback(services.sessions, tmp_path)
    assert mine in sft.read_text() and mine in prefs.read_text()
