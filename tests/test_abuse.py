"""A public Space under abuse: limits per session and per address, a full queue,
repeated sends, a browser that goes away, the vote/Regenerate race, deleting
one's data, and the upload route. Handlers on the tiny model, plus one test over
HTTP for what only the served app does."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select

from rlhf_chat.generation.worker import CHAT
from rlhf_chat.runtime import start_services
from rlhf_chat.serving.batcher import PairBatcher
from rlhf_chat.serving.handlers import BUSY, STILL_WRITING, ChatState, delete_my_data, regenerate, respond, vote
from rlhf_chat.storage import store
from rlhf_chat.storage.tables import Comparison, Conversation, Message

OUT_NOTICE, OUT_STATE = 3, 11


@pytest.fixture
def services(tiny_config):
    services = start_services(tiny_config, train=False)
    assert services.worker.ready.wait(120)
    yield services
    services.worker.stop()


def client(address: str):
    """What Gradio hands a handler: the connection's address and the headers."""
    return SimpleNamespace(client=SimpleNamespace(host=address), headers={})


def finish(updates):
    updates = list(updates)
    return updates[-1]


def pair_for(services, text: str, address: str = "10.0.0.1", state=None):
    return finish(respond(services, text, state, request=client(address)))[OUT_STATE]


def hold(worker) -> threading.Event:
    """Keep the model worker busy (as a long batch would) until the event is set."""
    release, started = threading.Event(), threading.Event()
    worker.submit(CHAT, lambda models: (started.set(), release.wait(60)))
    started.wait(30)
    return release


def test_regenerate_is_limited_per_session(services):
    services.config.ui.generations_per_minute = 3
    state = pair_for(services, "Tell me about owls.")
    for _ in range(2):
        state = finish(regenerate(services, state, request=client("10.0.0.1")))[OUT_STATE]
        assert state.phase == "vote"
    refused = finish(regenerate(services, state, request=client("10.0.0.1")))
    assert "Too many answers requested: you are" in refused[OUT_NOTICE]
    with services.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Comparison)) == 3  # the refused one wrote nothing
    assert refused[OUT_STATE].phase == "vote" and refused[OUT_STATE].pair_id == state.pair_id  # still votable


def test_a_new_session_from_the_same_address_does_not_reset_the_vote_limit(services):
    ui = services.config.ui
    ui.votes_per_minute, ui.people_per_address = 1, 2  # this address may vote twice a minute in all
    voted = []
    for k in range(3):  # three fresh sessions (three new clients) from one address
        state = pair_for(services, f"question {k}", "192.0.2.7")
        voted.append(vote(services, "a", None, state, request=client("192.0.2.7"))[OUT_NOTICE])
    assert [n.startswith("Recorded") for n in voted] == [True, True, False]
    assert "voting very fast" in voted[2]
    other = pair_for(services, "from elsewhere", "198.51.100.4")
    assert vote(services, "a", None, other, request=client("198.51.100.4"))[OUT_NOTICE].startswith("Recorded")
    # the proxy's header counts only when the app is told to trust it
    forged = SimpleNamespace(client=SimpleNamespace(host="192.0.2.7"), headers={"x-forwarded-for": "203.0.113.1"})
    assert services.address(forged) == "192.0.2.7"
    ui.trust_proxy = True
    assert services.address(forged) == "203.0.113.1"


def test_a_full_queue_says_so_and_keeps_the_message(services):
    services.batcher = PairBatcher(services.worker, services.config.sampling, max_people=8, max_waiting=1)
    release = hold(services.worker)
    first: list = []
    waiting = threading.Thread(target=lambda: first.append(finish(respond(services, "first in line", None))))
    waiting.start()
    while services.batcher.waiting() < 1:
        waiting.join(0.01)
    refused = finish(respond(services, "one too many", None))
    release.set()
    waiting.join(60)
    assert BUSY in refused[OUT_NOTICE] and "press Regenerate" in refused[OUT_NOTICE]
    assert refused[OUT_STATE].phase == "regenerate"  # the message is stored; Regenerate tries again
    assert first[0][OUT_STATE].phase == "vote"
    with services.sessions() as s:
        assert "one too many" in s.scalars(select(Message.content)).all()


def test_a_second_send_while_writing_is_refused_and_a_closed_browser_costs_no_decoding(services):
    release = hold(services.worker)
    state = ChatState()
    writing = respond(services, "Hello there", state)
    next(writing)  # the message is stored
    waiting = next(writing)  # the pair is queued behind the busy model, and the notice says so
    assert waiting[OUT_NOTICE].startswith("Waiting for the model") and services.batcher.waiting() == 1
    assert finish(respond(services, "and again", state))[OUT_NOTICE] == STILL_WRITING
    assert finish(regenerate(services, state))[OUT_NOTICE] == STILL_WRITING
    writing.close()  # the browser went away: Gradio closes the generator
    release.set()
    assert services.worker.call(CHAT, lambda models: "idle", timeout=60) == "idle"
    assert list(services.batcher.batch_sizes) == []  # the cancelled pair was never decoded
    assert not state.writing and state.phase == "regenerate"  # the message is kept: Regenerate writes its pair
    assert finish(regenerate(services, state))[OUT_STATE].phase == "vote"


def test_a_vote_and_a_regenerate_of_the_same_session_never_mix_their_pairs(services):
    """Fired together from threads, many times: each acknowledged vote stored the text
    of the pair it was cast on, never an empty answer, and nothing is lost."""
    services.config.ui.generations_per_minute = 10**6
    services.config.ui.votes_per_minute = 10**6
    acknowledged = 0
    for k in range(6):
        state = pair_for(services, f"race {k}")
        shown, seen = state.pair, state.pair_id
        results: dict[str, object] = {}
        threads = [
            threading.Thread(target=lambda: results.__setitem__("vote", vote(services, "b", None, state, seen))),
            threading.Thread(target=lambda: results.__setitem__("regen", finish(regenerate(services, state)))),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if results["vote"][OUT_NOTICE].startswith("Recorded"):
            acknowledged += 1
            assert state.history[-1] == {"role": "assistant", "content": shown[1]}
        else:  # the Regenerate got there first: the vote is refused, never cast on the new pair
            notice = results["vote"][OUT_NOTICE]
            assert notice == "There is no pair to vote on right now." or "no longer current" in notice
    with services.sessions() as s:
        answers = s.scalars(select(Message.content).where(Message.role == "assistant")).all()
        voted = s.scalar(select(func.count()).select_from(Comparison).where(Comparison.choice.is_not(None)))
    assert voted == acknowledged == len(answers) and all(answers)
    # a vote naming a pair that is no longer on screen is refused, not cast on the new one
    state = pair_for(services, "stale")
    old = state.pair_id
    state = finish(regenerate(services, state))[OUT_STATE]
    assert "no longer current" in vote(services, "a", None, state, pair_id=old)[OUT_NOTICE]


def test_delete_my_data_removes_the_session_and_nothing_else(services):
    mine = pair_for(services, "my secret question")
    vote(services, "a", None, mine)
    theirs = pair_for(services, "someone else's question")
    done = delete_my_data(services, mine)
    assert done[OUT_NOTICE].startswith("Deleted this session's data")
    with services.sessions() as s:
        assert s.scalars(select(Conversation.session_id)).all() == [theirs.session_id]
        assert "my secret question" not in s.scalars(select(Message.content)).all()
        assert s.scalars(select(Comparison.session_id)).all() == [theirs.session_id]
        assert store.count_votes(s) == 0
    assert done[OUT_STATE].history == [] and done[OUT_STATE].session_id == mine.session_id


def test_long_conversations_are_capped_and_huge_messages_cut_before_the_work(services):
    from rlhf_chat.text.chat import clean_message

    services.config.ui.max_turns = 2
    state = pair_for(services, "one")
    vote(services, "a", None, state)
    assert "New conversation" in finish(respond(services, "three", state))[OUT_NOTICE]
    huge = "x" * 50_000_000
    cleaned = clean_message(huge, 2000)
    assert len(cleaned.text) == 2000 and "50,000,000 characters" in cleaned.notice


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_over_http_uploads_are_capped_and_the_address_limit_spans_clients(services):
    """The served app: its config says analytics are off; Gradio's upload route refuses
    more than ui.max_upload_bytes, and two clients (two sessions) from 127.0.0.1 share
    that address's vote limit."""
    import httpx
    from gradio_client import Client

    from rlhf_chat.serving.ui import build_demo, launch_options

    ui = services.config.ui
    ui.votes_per_minute, ui.people_per_address, ui.max_upload_bytes = 1, 1, 100_000
    demo = build_demo(services)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options(services.config))
    try:
        url = f"http://127.0.0.1:{port}/"
        assert httpx.get(url + "config", timeout=60).json()["analytics_enabled"] is False  # privacy by default
        big = httpx.post(url + "gradio_api/upload", files={"files": ("big.bin", b"\0" * 2_000_000)}, timeout=60)
        small = httpx.post(url + "gradio_api/upload", files={"files": ("small.txt", b"hello")}, timeout=60)
        assert big.status_code == 413 and small.status_code == 200
        notices = []
        for _ in range(2):  # two fresh clients: two Gradio sessions, one address
            c = Client(url, verbose=False)
            c.predict("Hi!", api_name="/respond")
            notices.append(c.predict(None, api_name="/vote_a")[OUT_NOTICE])
        assert notices[0].startswith("Recorded") and "voting very fast" in notices[1]
    finally:
        demo.close()


def test_public_views_say_that_something_failed_and_only_the_admin_sees_what(services):
    from rlhf_chat.serving.admin import admin_details
    from rlhf_chat.serving.dashboard import recent_events
    from rlhf_chat.serving.handlers import status_line

    with services.sessions() as s, s.begin():
        store.add_event(s, "error", "OSError: [Errno 28] No space left on device: '/data/checkpoints/policy-7'")
    with services.sessions() as s:
        public, full = recent_events(s), recent_events(s, details=True)
    assert "error" in public and "/data/checkpoints" not in public
    assert "/data/checkpoints/policy-7" in full and "/data/checkpoints/policy-7" in admin_details(services)
    services.worker.load_error = FileNotFoundError("/home/space/.cache/model.gguf")
    assert "failed to load" in status_line(services) and ".cache" not in status_line(services)
    assert "/home/space/.cache/model.gguf" in admin_details(services)
    services.worker.load_error = None
