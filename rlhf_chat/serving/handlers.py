"""Handlers: what the chat tab does, as plain functions over the services and a
per-browser :class:`ChatState`.

Each handler returns (or, while answers are being written, yields) every
output of the chat tab, in the order :func:`view` gives them, so tests call
them directly and ``ui.build_demo`` only binds the services and wires them to
events. Every use of the model goes through the model worker; every write to
the database is one transaction, retried while the database is busy
(``store.write``), and acknowledged only once committed.
"""

from __future__ import annotations

import logging
import queue
import random
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from functools import partial
from typing import Self

import gradio as gr
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from rlhf_chat.generation.candidates import Candidate, Sampling, sample
from rlhf_chat.generation.modes import active_modes, mode_record_for, modes_for_pair
from rlhf_chat.generation.worker import CHAT
from rlhf_chat.learning.guards import client_key
from rlhf_chat.serving.batcher import BatcherFull, PairRequest
from rlhf_chat.serving.services import Services
from rlhf_chat.storage import store
from rlhf_chat.text.chat import (
    EmptyMessage,
    clean_message,
    prompt_text,
    render_prompt,
    trim_to_budget,
    with_system_prompt,
)

log = logging.getLogger(__name__)

DB_BUSY = "The database is busy right now (we retried for a few seconds)."
BUSY = "Many people are chatting right now; please try again in a minute."
GENERATION_FAILED = "Sorry, something went wrong while writing the answers."  # details go to the log only
STILL_WRITING = "Still writing the two answers; please wait for them."
WAITING_EVERY_S = 1.0  # while a pair waits for the model, the notice says so this often
STREAM_UPDATES_PER_S = 5.0  # pane refreshes a second, shared by everyone whose answers are being written
VOTE_LABELS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad"}
CUT_LABEL = " (cut off)"  # added to a pane's label when its answer did not end on its own
CUT_MARK = " …\n\n*(cut off: press Continue to read on)*"  # shown after a cut-off answer in the conversation
STRENGTH_LABELS = {"slightly better": "slightly", "clearly better": "clearly"}


class SessionLock:
    """A mutex that a copy of the state gets afresh (a copied state is another tab's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def __deepcopy__(self, memo) -> SessionLock:
        return SessionLock()


@dataclass
class ChatState:
    """One browser tab's conversation. Gradio keeps one per session."""

    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    conversation_id: int | None = None
    history: list[dict] = field(default_factory=list)  # the conversation the model continues
    pair_id: int | None = None  # the comparison on screen, None when there is none
    pair: tuple[str, str] = ("", "")
    pair_finished: tuple[bool, bool] = (True, True)  # False: that answer was cut off (length limit or a loop)
    cut_turns: set[int] = field(default_factory=set)  # history indices of assistant answers that were cut off
    answer_message_id: int | None = None  # the stored row of the last assistant answer (Continue extends it)
    phase: str = "chat"  # chat: type a message | vote: choose | regenerate: both were bad
    writing: bool = False  # two answers (or a continuation) are being written: a second send is refused
    expected: bool = False  # this session's pair is announced to the batcher and not yet submitted
    client: str = ""  # salted hash of the address it last wrote from (guards.client_key), stored with each pair
    # Events of one browser session run concurrently (Gradio shares this object
    # between them): the pair on screen changes only under this lock, so a vote
    # and a Regenerate never act on half of each other's work.
    lock: SessionLock = field(default_factory=lambda: SessionLock(), repr=False, compare=False)


# --- what the screen shows ---------------------------------------------------------------


def view(
    state: ChatState,
    notice: str = "",
    generating: bool = False,
    panes: tuple[str, str] | None = None,
    clear_input: bool = False,
    conversation: list[dict] | None = None,
) -> tuple:
    """Every output of every handler, in the order of ``build_demo``'s outputs.

    The input box is cleared only once its message is safely stored, so a
    refused message stays where the person typed it. A cut-off answer is
    marked in its pane's label and, once chosen, in the conversation, where
    Continue writes on.
    """
    pane_a, pane_b = panes if panes is not None else state.pair
    can_vote = state.phase == "vote" and not generating
    can_type = state.phase == "chat" and not generating
    can_regenerate = state.phase in ("vote", "regenerate") and not generating
    placeholder = {
        "chat": "Type a message and press Enter",
        "vote": "Pick the better answer first (or Regenerate)",
        "regenerate": "Press Regenerate for two new answers",
    }[state.phase]
    cut = [state.phase == "vote" and not generating and not done for done in state.pair_finished]
    return (
        conversation if conversation is not None else shown_history(state),
        gr.update(value=pane_a, label="Response A" + (CUT_LABEL if cut[0] else "")),
        gr.update(value=pane_b, label="Response B" + (CUT_LABEL if cut[1] else "")),
        notice,
        gr.update(interactive=can_type, placeholder="Writing..." if generating else placeholder)
        if not clear_input
        else gr.update(value="", interactive=can_type, placeholder="Writing..." if generating else placeholder),
        *[gr.update(interactive=can_vote) for _ in VOTE_LABELS],
        gr.update(interactive=can_regenerate),
        gr.update(interactive=can_continue(state) and not generating),
        state,
    )


def pane_view(state: ChatState, panes: tuple[str, str]) -> tuple:
    """A streaming update: the two panes' text, every other output left as it is.

    The full :func:`view` re-sends the conversation and every button, which
    Gradio renders and sends anew on each update; with 16 people streaming
    at once on 2 cores that halved the decoding speed (README, load figures).
    """
    skip = gr.skip()
    return (skip, gr.update(value=panes[0]), gr.update(value=panes[1]), skip, skip, *[skip for _ in VOTE_LABELS],
            skip, skip, state)


def shown_history(state: ChatState) -> list[dict]:
    """The conversation as the Chatbot shows it: cut-off answers marked."""
    return [
        {**m, "content": m["content"] + CUT_MARK} if i in state.cut_turns else dict(m)
        for i, m in enumerate(state.history)
    ]


def can_continue(state: ChatState) -> bool:
    """Whether the last turn is a chosen answer that was cut off (and nothing else is on)."""
    last = len(state.history) - 1
    return state.phase == "chat" and last >= 0 and state.history[last]["role"] == "assistant" and last in state.cut_turns


def status_line(services: Services) -> str:
    """Policy version and vote count, for the header."""
    worker = services.worker
    if worker.load_error is not None:  # the exception is in the log and on the admin panel
        return "**The model failed to load.** The app cannot answer until an admin restarts it."
    if not worker.ready.is_set():
        return "Loading the model..."
    with services.sessions() as session:
        votes = store.count_votes(session)
    loop_state = getattr(services.loop, "state_text", lambda: "")()
    parts = [f"Policy version **{worker.serving_version}**", f"votes collected: **{votes}**"]
    if loop_state:
        parts.append(loop_state)
    if services.follower is not None:
        parts.append("training: **on the trainer**" if services.follower.trainer_online()
                     else "training: **trainer offline** (your votes are kept)")
    return " · ".join(parts)


def stream(
    future: Future,
    updates: queue.Queue,
    first: tuple,
    show: Callable[[object], tuple],
    waiting: Callable[[object | None], tuple | None] | None = None,
    pace: Callable[[], float] | None = None,
) -> Iterator[tuple]:
    """The screens of a model job that streams its text: ``first``, then ``show(update)``
    for the newest update the job put on ``updates`` (older ones are skipped, so a
    slow browser never falls behind), until ``future`` is done.

    ``waiting(latest)``, when given, is asked for a screen after each ``WAITING_EVERY_S``
    without one (``latest``: the newest update so far, None before any; it returns
    None when there is nothing to say). ``pace()``, when given, is how long to wait
    after each screen. When the browser goes away Gradio closes the generator (through
    ``yield from``, this one too), and a job that has not started is cancelled.
    """
    latest = None
    shown_at = time.monotonic()
    try:
        yield first
        while not future.done():
            try:
                latest = updates.get(timeout=0.1)
                while not updates.empty():  # skip to the newest text
                    latest = updates.get_nowait()
            except queue.Empty:
                if waiting is None or time.monotonic() - shown_at < WAITING_EVERY_S:
                    continue
                screen = waiting(latest)
                if screen is not None:
                    yield screen
                    shown_at = time.monotonic()
                continue
            yield show(latest)
            shown_at = time.monotonic()
            if pace is not None:
                wait_futures([future], timeout=pace())  # returns at once when the job is done
    finally:
        if not future.done():  # the browser went away (Gradio closed this generator)
            future.cancel()  # before its job started: no decoding for nobody


# --- writing two answers -------------------------------------------------------------------


def _context_for(services: Services, history: list[dict], tokenizer) -> list[dict]:
    """The conversation the model continues: the system prompt, then as many newest turns as fit the budget."""
    cfg = services.config.sampling
    return trim_to_budget(tokenizer, with_system_prompt(history, cfg.system_prompt), cfg.context_tokens)


def _pair_prompt(services: Services, history: list[dict], tokenizer) -> tuple[list[dict], list[int]]:
    """What a pair answers and its prompt's tokens (the batcher calls it with the tokenizer)."""
    context = _context_for(services, history, tokenizer)
    return context, render_prompt(tokenizer, context)


def _draw_modes(services: Services, prompt: str):
    """Two response modes for a policy pair answering ``prompt``, a share
    ``loop.mode_fraction`` of the time (else None).

    The modes in use are read per pair, so an admin's change applies to the next
    message; a database that cannot be read means a plain pair, not an error.
    With ``loop.mode_choice`` per_kind the draw reads the votes on questions of
    ``prompt``'s kind (``modes.mode_record_for``).
    """
    fraction = services.config.loop.mode_fraction
    if fraction <= 0:
        return None
    try:
        with services.sessions() as session:
            modes = active_modes(session, services.config.loop.answer_first)
            record = mode_record_for(session, services.config.loop.mode_choice, prompt)
    except OperationalError:
        return None
    return modes_for_pair(modes, fraction, random.Random(secrets.randbits(64)), record)


def _waiting_view(services: Services, state: ChatState, clear_input: bool, latest) -> tuple | None:
    """While nothing of the pair is written yet: a notice that says why (None once text shows).

    It also gives Gradio a yield at which it can stop the generator if the
    browser has gone away.
    """
    panes = tuple(latest) if latest is not None else ("", "")
    if any(panes):
        return None
    waiting = services.batcher.waiting()
    ahead = f" ({waiting} people waiting)" if waiting > 1 else ""
    message = f"Waiting for the model, which is writing other people's answers{ahead}..."
    return view(state, message, generating=True, panes=panes, clear_input=clear_input)


def _pace(services: Services) -> float:
    """Seconds between one person's pane updates.

    Screen updates share a budget for the whole server: each costs a render
    and a send, and with 8 people streaming every 0.2 s those took half the
    CPU from the decoding itself (README, load figures).
    """
    return max(1, services.batcher.running) / STREAM_UPDATES_PER_S


def _generate(services: Services, state: ChatState, clear_input: bool = False, notice: str = "") -> Iterator[tuple]:
    """Stream two candidates for the current history into the panes, then store the pair.

    The caller holds ``state.writing`` (``_start_writing``) and clears it however
    this ends. When the browser goes away, Gradio closes the generator, and a
    request whose batch has not started is taken out of it (:func:`stream`).
    """
    updates: queue.Queue = queue.Queue()
    arena = services.worker.serving_version > 0 and random.random() < services.config.loop.arena_fraction
    pair_modes = None if arena else _draw_modes(services, prompt_text(state.history))
    history = list(state.history)  # what this pair answers, whatever the session does meanwhile
    request = PairRequest(partial(_pair_prompt, services, history), arena, pair_modes, updates.put)
    expected, state.expected = state.expected, False  # submitting settles the announcement, whatever follows
    try:
        future = services.batcher.submit(request, expected=expected)
    except BatcherFull:
        state.phase = "regenerate" if state.history else "chat"
        yield view(state, BUSY + " Your message is kept: press Regenerate.", clear_input=clear_input)
        return
    # One full update (buttons off, the notice); then only the panes stream.
    first = view(state, notice or "Writing two answers...", generating=True, panes=("", ""), clear_input=clear_input)
    yield from stream(future, updates, first, show=lambda panes: pane_view(state, tuple(panes)),
                      waiting=partial(_waiting_view, services, state, clear_input), pace=partial(_pace, services))
    try:
        context, a, b = future.result()
    except Exception:  # the message is stored; the person can press Regenerate
        log.exception("generation failed")
        state.phase = "regenerate" if state.history else "chat"
        yield view(state, f"{GENERATION_FAILED} Press Regenerate to try again.", clear_input=clear_input)
        return
    yield _show_pair(services, state, context, a, b, arena, clear_input, notice)


def _show_pair(
    services: Services, state: ChatState, context: list[dict], a: Candidate, b: Candidate, arena: bool,
    clear_input: bool, notice: str,
) -> tuple:
    """Store a written pair, then put it up for the vote."""

    def save(session: Session) -> int:
        return store.save_pair(
            session, session_id=state.session_id, context=context, a=a, b=b,
            conversation_id=state.conversation_id, arena=arena, client=state.client,
        ).id

    try:
        pair_id = store.write(services.sessions, save)
    except OperationalError:
        state.phase = "regenerate"
        return view(state, DB_BUSY + " The two answers could not be stored; press Regenerate.", clear_input=clear_input)
    with state.lock:
        state.pair_id = pair_id
        state.pair = (a.text, b.text)
        state.pair_finished = (a.finished, b.finished)
        state.phase = "vote"
    return view(state, f"{notice} Which answer is better?".strip(), clear_input=clear_input)


def _start_writing(services: Services, state: ChatState, request, pair: bool = True) -> str | None:
    """Claim the session for writing: None, or why not (already writing, or over a limit).

    For a ``pair``, the batcher is told one is on its way (``PairBatcher.expect``),
    so that a batch about to start waits the moment it takes to store the message.
    """
    with state.lock:
        if state.writing:
            return STILL_WRITING
        address = services.address(request)
        refusal = services.admission.generation(state.session_id, address)
        if refusal is None:
            state.client = client_key(address, services.config.guards.client_salt)
            state.writing = True
            state.expected = pair
            if pair:
                services.batcher.expect()
        return refusal


def _stop_writing(services: Services, state: ChatState) -> None:
    """Release the session after writing, however it ended. A message left without
    a pair (the browser went away, or writing failed) waits for Regenerate."""
    with state.lock:
        if state.expected:  # announced to the batcher but never submitted
            services.batcher.unexpect()
        state.writing = state.expected = False
        if state.phase == "chat" and state.history and state.history[-1]["role"] == "user":
            state.phase = "regenerate"


def _store_message(session: Session, state: ChatState, text: str) -> int:
    """Store a person's message (in a new conversation if the session has none): its conversation's id."""
    conversation_id = state.conversation_id or store.start_conversation(session, state.session_id).id
    store.add_message(session, conversation_id, "user", text)
    return conversation_id  # adopted only once committed


def respond(services: Services, message: str, state: ChatState | None, request=None) -> Iterator[tuple]:
    """A person sent a message: store it, then stream two candidates."""
    state = state or ChatState()
    if state.writing:
        yield view(state, STILL_WRITING)
        return
    if state.phase != "chat":
        yield view(state, "Please vote on the two answers first (or press Regenerate).")
        return
    if len(state.history) >= services.config.ui.max_turns:
        yield view(state, "This conversation is long enough; press New conversation to start another.")
        return
    try:
        cleaned = clean_message(message, services.config.sampling.max_message_chars)
    except EmptyMessage as exc:
        yield view(state, str(exc))
        return
    refusal = _start_writing(services, state, request)
    if refusal is not None:  # nothing stored: the message stays in the box
        yield view(state, refusal)
        return
    try:
        try:
            state.conversation_id = store.write(services.sessions,
                                                lambda session: _store_message(session, state, cleaned.text))
        except OperationalError:  # nothing stored: the message stays in the box to send again
            yield view(state, DB_BUSY + " Your message was not sent; please send it again.")
            return
        with state.lock:
            state.history.append({"role": "user", "content": cleaned.text})
            state.pair, state.pair_id, state.answer_message_id = ("", ""), None, None
        yield from _generate(services, state, clear_input=True, notice=cleaned.notice)
    finally:
        _stop_writing(services, state)


def regenerate(services: Services, state: ChatState | None, request=None) -> Iterator[tuple]:
    """Two new candidates for the same context; the old pair can no longer be voted on."""
    state = state or ChatState()
    if not state.history or state.history[-1]["role"] != "user":
        yield view(state, "Send a message first.")
        return
    refusal = _start_writing(services, state, request)
    if refusal is not None:
        yield view(state, refusal)
        return
    try:
        with state.lock:
            answered = not state.history or state.history[-1]["role"] != "user"  # a vote got there first
            if not answered:
                state.pair, state.pair_id = ("", ""), None
        if answered:
            yield view(state, "Send a message first.")
            return
        yield from _generate(services, state)
    finally:
        _stop_writing(services, state)


# --- votes and written answers -------------------------------------------------------------


def vote(
    services: Services,
    choice: str,
    strength_label: str | None,
    state: ChatState | None,
    pair_id: int | None = None,
    request=None,
) -> tuple:
    """Store a vote, then continue the conversation with the chosen answer.

    ``pair_id`` is the pair the person saw; by default the one in the state.
    The whole vote runs under the session's lock and the chosen text is read
    from the stored pair, so a Regenerate of the same session can neither swap
    the pair underneath nor leave an empty answer behind. The vote is
    committed before this returns, so what the UI shows as recorded is in the
    database.
    """
    state = state or ChatState()
    with state.lock:
        target = state.pair_id if pair_id is None else pair_id
        if target is None or state.phase != "vote" or state.writing:
            return view(state, "There is no pair to vote on right now.")
        refusal = services.admission.vote(state.session_id, services.address(request))
        if refusal is not None:
            return view(state, refusal)
        return _store_vote(services, state, target, choice, STRENGTH_LABELS.get(strength_label or ""))


def _vote_rows(
    session: Session, state: ChatState, target: int, choice: str, strength: str | None, side: int
) -> tuple[store.VoteResult, str, int | None]:
    """The vote's rows in one transaction: the vote, and the chosen answer as the next message."""
    result = store.record_vote(session, target, choice, strength, state.session_id)
    chosen = store.pair_texts(session, target)[side]
    if result.ok and choice != "both_bad":
        return result, chosen, store.add_message(session, state.conversation_id, "assistant", chosen).id
    return result, chosen, None


def _store_vote(services: Services, state: ChatState, target: int, choice: str, strength: str | None) -> tuple:
    """The vote itself (under the session's lock): stored, then the conversation goes on."""
    side = 1 if choice == "b" else 0  # a tie continues with A
    try:
        result, chosen, message_id = store.write(
            services.sessions, lambda session: _vote_rows(session, state, target, choice, strength, side)
        )
    except OperationalError:  # not stored, so not acknowledged: the person can click again
        return view(state, DB_BUSY + " Your vote was not saved; please click again.")
    if not result.ok:
        return view(state, result.message)
    if choice == "both_bad":
        state.phase = "regenerate"
        return view(state, "Recorded: both are bad. Press Regenerate for two new answers.")
    state.history.append({"role": "assistant", "content": chosen})
    if not state.pair_finished[side]:
        state.cut_turns.add(len(state.history) - 1)
    state.answer_message_id = message_id
    state.pair, state.pair_id, state.phase = ("", ""), None, "chat"
    then = (
        "It was cut off: press Continue to read on, or go on with the conversation."
        if can_continue(state) else "Continue the conversation."
    )
    return view(state, f"Recorded: {VOTE_LABELS[choice]}. Thank you! {then}")


def start_from(side: str, state: ChatState | None) -> tuple:
    """Prefill the "write a better answer" box: with answer A or B to edit, or empty
    (``side`` ""), and remember which one it started from: (box, started_from)."""
    state = state or ChatState()
    if state.pair_id is None or state.phase not in ("vote", "regenerate") or state.writing:
        return gr.update(), ""
    text = {"a": state.pair[0], "b": state.pair[1]}.get(side, "")
    return gr.update(value=text), side if side in ("a", "b") else ""


def _demonstration_rows(session: Session, state: ChatState, text: str, started_from: str):
    """A written answer's rows in one transaction: the answer, and it as the next message."""
    result = store.add_demonstration(session, state.pair_id, state.session_id, text, started_from)
    if not result.ok:
        return result, None
    return result, store.add_message(session, state.conversation_id, "assistant", text).id


def submit_demonstration(
    services: Services, text: str, started_from: str, state: ChatState | None, request=None
) -> tuple:
    """Store the answer a person wrote for the pair on screen, then continue the
    conversation with it, as a chosen answer does: the chat's outputs, then the box.

    Cleaned as a message is (empty and over-long texts refused with the reason,
    nothing stored); one identical to the answer it started from is refused (a
    vote says that); the vote limit applies. Committed before it is acknowledged.
    """
    state = state or ChatState()
    keep = gr.update()  # a refused text stays in the box, to be fixed
    with state.lock:
        if state.pair_id is None or state.phase not in ("vote", "regenerate") or state.writing:
            return (*view(state, "There is no pair to write a better answer for right now."), keep)
        try:
            cleaned = clean_message(text or "", services.config.sampling.max_message_chars)
        except EmptyMessage:
            return (*view(state, "Your answer is empty: write the answer you wanted, then submit it."), keep)
        if cleaned.notice:  # over the limit: cut, a message goes on; an answer to learn from must be whole
            limit = services.config.sampling.max_message_chars
            return (*view(state, f"Your answer is {len(text):,} characters; the limit is {limit:,}. "
                                 "Shorten it, then submit it."), keep)
        refusal = services.admission.vote(state.session_id, services.address(request))
        if refusal is not None:
            return (*view(state, refusal), keep)
        try:
            result, message_id = store.write(
                services.sessions, lambda session: _demonstration_rows(session, state, cleaned.text, started_from)
            )
        except OperationalError:  # not stored, so not acknowledged: the person can submit again
            return (*view(state, DB_BUSY + " Your answer was not saved; please submit it again."), keep)
        if not result.ok:
            return (*view(state, result.message), keep)
        state.history.append({"role": "assistant", "content": cleaned.text})
        state.answer_message_id = message_id
        state.pair, state.pair_id, state.phase = ("", ""), None, "chat"
        return (*view(state, "Recorded: your answer. Thank you! It teaches the model what you wanted. "
                             "Continue the conversation."), gr.update(value=""))


# --- writing on where an answer was cut off -------------------------------------------------


def continue_answer(services: Services, state: ChatState | None, request=None) -> Iterator[tuple]:
    """Write on where the chosen, cut-off answer stopped, streamed into the conversation.

    The continuation becomes part of that answer, on screen, in the stored
    conversation and in the context of what follows. It is the serving
    policy writing on; it is not a candidate and nobody votes on it.
    """
    state = state or ChatState()
    if not can_continue(state):
        yield view(state, "There is no cut-off answer to continue.")
        return
    refusal = _start_writing(services, state, request, pair=False)
    if refusal is not None:
        yield view(state, refusal)
        return
    try:
        yield from _write_on(services, state)
    finally:
        _stop_writing(services, state)


def _continue_last(services: Services, history: list[dict], sampling: Sampling, on_update, models):
    """The model-worker job of Continue: more of the last answer of ``history``, by the serving policy."""
    context = _context_for(services, history, models.tokenizer)
    return continue_text(models.serving, models.tokenizer, context, sampling, on_update)


def _write_on(services: Services, state: ChatState) -> Iterator[tuple]:
    """Stream the continuation of the last answer into the conversation, then store the longer answer."""
    turn = len(state.history) - 1
    before = state.history[turn]["content"]
    updates: queue.Queue = queue.Queue()
    sampling = Sampling.from_config(services.config.sampling, secrets.randbelow(2**31))
    future = services.worker.submit(CHAT, partial(_continue_last, services, state.history, sampling, updates.put))
    shown = shown_history(state)

    def show(update) -> tuple:
        shown[turn] = {"role": "assistant", "content": before + update[0]}
        return view(state, "Writing on...", generating=True, conversation=shown)

    yield from stream(future, updates, view(state, "Writing on...", generating=True, conversation=shown), show)
    try:
        added, finished = future.result()
    except Exception:  # the answer stays as it was; the person can press Continue again
        log.exception("continuing failed")
        yield view(state, "Sorry, something went wrong while writing on. Press Continue to try again.")
        return
    yield _store_continuation(services, state, turn, before + added, finished)


def _store_continuation(services: Services, state: ChatState, turn: int, full: str, finished: bool) -> tuple:
    """Store the continued answer in place of the cut-off one, then show it."""
    try:
        if state.answer_message_id is not None:
            store.write(services.sessions,
                        lambda session: store.set_message_content(session, state.answer_message_id, full))
    except OperationalError:
        return view(state, DB_BUSY + " The continued answer was not saved; press Continue again.")
    state.history[turn] = {"role": "assistant", "content": full}
    if finished:
        state.cut_turns.discard(turn)
    return view(state, "Done. Continue the conversation." if finished else "Cut off again: press Continue for more.")


def continue_text(model, tokenizer, context: list[dict], sampling: Sampling, on_update=None) -> tuple[str, bool]:
    """More of the last (assistant) message of ``context``: (the text added, whether it ended).

    The model continues the answer's own tokens in its turn, with no end of
    turn between, as if it had never been cut off.
    """
    prompt = render_prompt(tokenizer, context[:-1]) + tokenizer.encode(context[-1]["content"], add_special_tokens=False)
    out = sample(model, tokenizer, [prompt], sampling, on_update=on_update)
    added = tokenizer.decode(out.response_ids[0, : out.token_counts[0]].tolist(), skip_special_tokens=True)
    return added.rstrip(), out.finished[0]


# --- starting over ---------------------------------------------------------------------------


def new_conversation(services: Services, state: ChatState | None) -> tuple:
    """Start over, keeping the browser session (and its rate limit)."""
    if state is not None and state.writing:
        return view(state, STILL_WRITING)
    fresh = ChatState(session_id=state.session_id if state else uuid.uuid4().hex)  # the limits go with the session id
    return view(fresh, "New conversation started.")


def delete_my_data(services: Services, state: ChatState | None) -> tuple:
    """Remove this session's conversations, pairs and votes from the database, and start afresh."""
    if state is None:
        return view(ChatState(), "Nothing stored for this session yet.")
    if state.writing:
        return view(state, STILL_WRITING)
    try:
        removed = store.write(services.sessions, lambda session: store.delete_session_data(session, state.session_id))
    except OperationalError:
        return view(state, DB_BUSY + " Nothing was deleted; please try again.")
    return view(ChatState(session_id=state.session_id), f"Deleted this session's data ({removed} rows).")
