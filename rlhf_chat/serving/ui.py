"""UI: the Gradio app. Chat, two candidates side by side, four vote buttons;
a Training tab that shows the loop improving the policy; admin controls.

The handlers are plain functions over a per-browser :class:`ChatState`, so
tests call them directly; :func:`build_demo` only lays out components and wires
events. Every use of the model goes through the model worker.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import random
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import gradio as gr
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from rlhf_chat.config import AppConfig
from rlhf_chat.generation.candidates import Sampling, sample
from rlhf_chat.generation.modes import active_modes, mode_record_for, modes_for_pair
from rlhf_chat.generation.worker import CHAT, ModelWorker
from rlhf_chat.learning.guards import client_key
from rlhf_chat.serving import controls, dashboard
from rlhf_chat.serving.admission import AdminGuard, Admission, client_address
from rlhf_chat.serving.batcher import BatcherFull, PairBatcher, PairRequest
from rlhf_chat.serving.health import health_route
from rlhf_chat.storage import store
from rlhf_chat.text.behaviours import DETECTORS
from rlhf_chat.text.chat import EmptyMessage, clean_message, render_prompt, trim_to_budget, with_system_prompt

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


@dataclass
class Services:
    """What the handlers need: settings, the model worker, the database, the training loop."""

    config: AppConfig
    worker: ModelWorker
    sessions: sessionmaker[Session]
    loop: object | None = None  # training_loop.TrainingLoop, when training runs
    batcher: PairBatcher | None = None  # people's pairs written together; made from the config when None
    admission: Admission | None = None  # generation and vote limits, per session and per address
    admin_guard: AdminGuard | None = None  # wrong admin passwords, per address
    follower: object | None = None  # follower.PolicyFollower, on a serve replica
    lease_keeper: object | None = None  # lease.LeaseKeeper, on the trainer

    def __post_init__(self) -> None:
        ui = self.config.ui
        if self.batcher is None:
            self.batcher = PairBatcher(self.worker, self.config.sampling, ui.batch_people, ui.batch_wait_s, ui.max_waiting)
        self.admission = self.admission or Admission(ui)
        self.admin_guard = self.admin_guard or AdminGuard(ui)

    def address(self, request) -> str:
        """Who sent this event (``admission.client_address``)."""
        return client_address(request, self.config.ui.trust_proxy)

    def stop(self) -> None:
        """Stop training, then the worker (each after the slice under way); a trainer
        gives its lease back last, once nothing of it trains any more."""
        if self.follower is not None:
            self.follower.stop()
        if self.loop is not None:
            self.loop.stop()
        self.worker.stop()
        if self.lease_keeper is not None:
            self.lease_keeper.stop()


class SessionLock:
    """A mutex that a copy of the state gets afresh (a copied state is another tab's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> SessionLock:
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


# --- handlers ----------------------------------------------------------------------------


def _context_for(services: Services, history: list[dict], tokenizer) -> list[dict]:
    """The conversation the model continues: the system prompt, then as many newest turns as fit the budget."""
    cfg = services.config.sampling
    return trim_to_budget(tokenizer, with_system_prompt(history, cfg.system_prompt), cfg.context_tokens)


def _draw_modes(services: Services):
    """Two response modes for a policy pair, a share ``loop.mode_fraction`` of the time (else None).

    The modes in use are read per pair, so an admin's change applies to the next
    message; a database that cannot be read means a plain pair, not an error.
    """
    fraction = services.config.loop.mode_fraction
    if fraction <= 0:
        return None
    try:
        with services.sessions() as session:
            modes = active_modes(session)
            record = mode_record_for(session, services.config.loop.mode_choice)
    except OperationalError:
        return None
    return modes_for_pair(modes, fraction, random.Random(secrets.randbits(64)), record)


def _generate(services: Services, state: ChatState, clear_input: bool = False, notice: str = "") -> Iterator[tuple]:
    """Stream two candidates for the current history into the panes, then store the pair.

    The caller holds ``state.writing`` (``_start_writing``) and clears it however
    this ends. When the browser goes away, Gradio closes the generator, and a
    request whose batch has not started is taken out of it.
    """
    updates: queue.Queue = queue.Queue()
    cfg = services.config
    arena = services.worker.serving_version > 0 and random.random() < cfg.loop.arena_fraction
    pair_modes = None if arena else _draw_modes(services)
    history = list(state.history)  # what this pair answers, whatever the session does meanwhile

    def build(tokenizer) -> tuple[list[dict], list[int]]:
        context = _context_for(services, history, tokenizer)
        return context, render_prompt(tokenizer, context)

    expected, state.expected = state.expected, False  # submitting settles the announcement, whatever follows
    try:
        future = services.batcher.submit(PairRequest(build, arena, pair_modes, updates.put), expected=expected)
    except BatcherFull:
        state.phase = "regenerate" if state.history else "chat"
        yield view(state, BUSY + " Your message is kept: press Regenerate.", clear_input=clear_input)
        return
    panes = ("", "")
    shown_at = time.monotonic()
    try:
        # One full update (buttons off, the notice); then only the panes stream.
        yield view(state, notice or "Writing two answers...", generating=True, panes=panes, clear_input=clear_input)
        while not future.done():
            try:
                panes = tuple(updates.get(timeout=0.1))  # type: ignore[assignment]
                while not updates.empty():  # skip to the newest text
                    panes = tuple(updates.get_nowait())  # type: ignore[assignment]
            except queue.Empty:
                if time.monotonic() - shown_at < WAITING_EVERY_S or any(panes):
                    continue
                # Nothing written yet: say why, and give Gradio a yield at which
                # it can stop this generator if the browser has gone away.
                waiting = services.batcher.waiting()
                ahead = f" ({waiting} people waiting)" if waiting > 1 else ""
                message = f"Waiting for the model, which is writing other people's answers{ahead}..."
                yield view(state, message, generating=True, panes=panes, clear_input=clear_input)
                shown_at = time.monotonic()
                continue
            yield pane_view(state, panes)
            shown_at = time.monotonic()
            # Screen updates share a budget for the whole server: each costs a
            # render and a send, and with 8 people streaming every 0.2 s those
            # took half the CPU from the decoding itself (README, load figures).
            pace = max(1, services.batcher.running) / STREAM_UPDATES_PER_S
            wait_futures([future], timeout=pace)  # returns at once when the pair is done
    finally:
        if not future.done():  # the browser went away (Gradio closed this generator)
            future.cancel()  # before its batch started: no decoding for nobody
    try:
        context, a, b = future.result()
    except Exception:  # the message is stored; the person can press Regenerate
        log.exception("generation failed")
        state.phase = "regenerate" if state.history else "chat"
        yield view(state, f"{GENERATION_FAILED} Press Regenerate to try again.", clear_input=clear_input)
        return

    def save() -> int:
        with services.sessions() as session, session.begin():
            return store.save_pair(
                session,
                session_id=state.session_id,
                context=context,
                a=a,
                b=b,
                conversation_id=state.conversation_id,
                arena=arena,
                client=state.client,
            ).id

    try:
        pair_id = store.with_retry(save)
    except OperationalError:
        state.phase = "regenerate"
        yield view(state, DB_BUSY + " The two answers could not be stored; press Regenerate.", clear_input=clear_input)
        return
    with state.lock:
        state.pair_id = pair_id
        state.pair = (a.text, b.text)
        state.pair_finished = (a.finished, b.finished)
        state.phase = "vote"
    yield view(state, f"{notice} Which answer is better?".strip(), clear_input=clear_input)


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

    def save() -> int:
        with services.sessions() as session, session.begin():
            conversation_id = state.conversation_id or store.start_conversation(session, state.session_id).id
            store.add_message(session, conversation_id, "user", cleaned.text)
            return conversation_id  # adopted only once committed

    try:
        try:
            state.conversation_id = store.with_retry(save)
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


def _store_vote(services: Services, state: ChatState, target: int, choice: str, strength: str | None) -> tuple:
    """The vote itself (under the session's lock): stored, then the conversation goes on."""
    side = 1 if choice == "b" else 0  # a tie continues with A

    def save() -> tuple[store.VoteResult, str, int | None]:
        with services.sessions() as session, session.begin():
            result = store.record_vote(session, target, choice, strength, state.session_id)
            chosen = store.pair_texts(session, target)[side]
            if result.ok and choice != "both_bad":
                return result, chosen, store.add_message(session, state.conversation_id, "assistant", chosen).id
            return result, chosen, None

    try:
        result, chosen, message_id = store.with_retry(save)
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

        def save() -> tuple[store.VoteResult, int | None]:
            with services.sessions() as session, session.begin():
                result = store.add_demonstration(session, state.pair_id, state.session_id, cleaned.text, started_from)
                if not result.ok:
                    return result, None
                return result, store.add_message(session, state.conversation_id, "assistant", cleaned.text).id

        try:
            result, message_id = store.with_retry(save)
        except OperationalError:  # not stored, so not acknowledged: the person can submit again
            return (*view(state, DB_BUSY + " Your answer was not saved; please submit it again."), keep)
        if not result.ok:
            return (*view(state, result.message), keep)
        state.history.append({"role": "assistant", "content": cleaned.text})
        state.answer_message_id = message_id
        state.pair, state.pair_id, state.phase = ("", ""), None, "chat"
        return (*view(state, "Recorded: your answer. Thank you! It teaches the model what you wanted. "
                             "Continue the conversation."), gr.update(value=""))


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


def _write_on(services: Services, state: ChatState) -> Iterator[tuple]:
    turn = len(state.history) - 1
    before = state.history[turn]["content"]
    updates: queue.Queue = queue.Queue()
    sampling = Sampling.from_config(services.config.sampling, secrets.randbelow(2**31))

    def job(models):
        context = _context_for(services, state.history, models.tokenizer)
        return continue_text(models.serving, models.tokenizer, context, sampling, updates.put)

    future = services.worker.submit(CHAT, job)
    shown = shown_history(state)
    try:
        yield view(state, "Writing on...", generating=True, conversation=shown)
        while not future.done():
            try:
                added = updates.get(timeout=0.1)[0]
                while not updates.empty():  # skip to the newest text
                    added = updates.get_nowait()[0]
            except queue.Empty:
                continue
            shown[turn] = {"role": "assistant", "content": before + added}
            yield view(state, "Writing on...", generating=True, conversation=shown)
    finally:
        future.cancel()  # the browser went away before the job started: no decoding for nobody
    try:
        added, finished = future.result()
    except Exception:  # the answer stays as it was; the person can press Continue again
        log.exception("continuing failed")
        yield view(state, "Sorry, something went wrong while writing on. Press Continue to try again.")
        return
    full = before + added

    def save() -> None:
        with services.sessions() as session, session.begin():
            store.set_message_content(session, state.answer_message_id, full)

    try:
        if state.answer_message_id is not None:
            store.with_retry(save)
    except OperationalError:
        yield view(state, DB_BUSY + " The continued answer was not saved; press Continue again.")
        return
    state.history[turn] = {"role": "assistant", "content": full}
    if finished:
        state.cut_turns.discard(turn)
    yield view(state, "Done. Continue the conversation." if finished else "Cut off again: press Continue for more.")


def continue_text(model, tokenizer, context: list[dict], sampling: Sampling, on_update=None) -> tuple[str, bool]:
    """More of the last (assistant) message of ``context``: (the text added, whether it ended).

    The model continues the answer's own tokens in its turn, with no end of
    turn between, as if it had never been cut off.
    """
    prompt = render_prompt(tokenizer, context[:-1]) + tokenizer.encode(context[-1]["content"], add_special_tokens=False)
    out = sample(model, tokenizer, [prompt], sampling, on_update=on_update)
    added = tokenizer.decode(out.response_ids[0, : out.token_counts[0]].tolist(), skip_special_tokens=True)
    return added.rstrip(), out.finished[0]


def new_conversation(services: Services, state: ChatState | None) -> tuple:
    """Start over, keeping the browser session (and its rate limit)."""
    if state is not None and state.writing:
        return view(state, STILL_WRITING)
    fresh = ChatState(session_id=state.session_id if state else uuid.uuid4().hex)  # the limits go with the session id
    return view(fresh, "New conversation started.")


# --- the Training tab -------------------------------------------------------------------


def training_tick(services: Services, board: dashboard.ProbeBoard) -> tuple:
    """Everything the Training tab shows: :func:`dashboard.refresh`'s outputs, then the probe,
    behaviour and mode tables.

    The probes are read from the board without waiting; a changed policy
    version only queues their recomputation (see :class:`dashboard.ProbeBoard`).
    """
    probes = board.answers(services.worker)
    with services.sessions() as session:
        behaviours = dashboard.behaviour_table(session, probes)
        modes = dashboard.mode_table(session)
    refreshed = dashboard.refresh(services.sessions, services.loop, services.follower)
    return (*refreshed, dashboard.probe_table(probes), behaviours, modes)


# --- admin -------------------------------------------------------------------------------

WRONG_PASSWORD_DELAY_S = 1.0  # each wrong guess waits this long (on the event loop: no thread is held)
NOT_AUTHORISED = "Not authorised: enter the admin password first."
LOCKED_OUT = "Too many wrong passwords from your address; try again later."


async def _admin_refusal(services: Services, password: str | None, request, wrong: str) -> str | None:
    """None for the right password from an address that is not locked out, else the message to show.

    Wrong guesses are counted and logged per address, wait without holding a
    thread (``asyncio.sleep``), and lock the address out after
    ``ui.admin_max_failures``; a locked-out address is refused without its
    guess even being checked.
    """
    address = services.address(request)
    if services.admin_guard.locked(address):
        return LOCKED_OUT
    if controls.check_admin(password, services.config):
        return None
    services.admin_guard.failed(address)
    await asyncio.sleep(WRONG_PASSWORD_DELAY_S)
    return wrong


async def unlock(services: Services, password: str | None, request=None) -> tuple:
    """Show the admin controls for the right password: (panel, message, rollback choices, mode choices)."""
    refusal = await _admin_refusal(services, password, request, "Wrong password.")
    if refusal is not None:
        return gr.update(visible=False), refusal, gr.update(), gr.update()
    choices = await asyncio.to_thread(lambda: (_rollback_choices(services), _mode_choices(services)))
    return gr.update(visible=True), "Unlocked. " + await asyncio.to_thread(admin_details, services), *choices


def admin_details(services: Services) -> str:
    """What the public views leave out: the model's load error, the training error, the events in full."""
    parts = []
    if services.worker.load_error is not None:
        parts.append(f"**The model failed to load:** {services.worker.load_error}")
    if services.loop is not None:
        parts.append(services.loop.state_text(details=True))
    if services.follower is not None:
        parts.append(services.follower.state_markdown(details=True))
    with services.sessions() as session:
        parts.append(dashboard.recent_events(session, limit=10, details=True))
    return "\n\n".join(p for p in parts if p)


def _mode_choices(services: Services):
    return gr.update(choices=controls.mode_names(services.sessions), value=None)


async def admin_modes(services: Services, action, password: str | None, *args, request=None) -> tuple:
    """Add or remove a response mode for an admin: (message, the modes now in use)."""
    refusal = await _admin_refusal(services, password, request, NOT_AUTHORISED)
    if refusal is not None:
        return refusal, gr.update()
    message, _ = await asyncio.to_thread(_run_control, services, action, *args)
    return message, await asyncio.to_thread(_mode_choices, services)


def _rollback_choices(services: Services):
    versions = controls.policy_versions(services.sessions)
    return gr.update(choices=versions, value=versions[0] if versions else None)


async def admin_control(services: Services, action, password: str | None, *args, request=None) -> tuple:
    """Run one control for an admin: (message, rollback choices).

    The password is checked here, on the server, on every call: hidden
    components are only hidden in the browser, and anyone can send an event.
    The control itself runs in a thread (it may wait on the model worker).
    """
    refusal = await _admin_refusal(services, password, request, NOT_AUTHORISED)
    if refusal is not None:
        return refusal, gr.update()
    return await asyncio.to_thread(_run_control, services, action, *args)


def _run_control(services: Services, action, *args) -> tuple:
    try:
        message = action(services, *args)
    except controls.ControlError as exc:
        return str(exc), gr.update()
    except Exception as exc:  # shown to the admin (and logged); the chat is unaffected
        log.exception("admin control failed")
        return f"Failed: {type(exc).__name__}: {exc}", gr.update()
    return message, _rollback_choices(services)


async def admin_export(services: Services, password: str | None, request=None) -> tuple:
    """Write the preferences and the written answers as JSON Lines for download: (files, message).

    The file lives in a folder of its own that is deleted ``ui.cache_cleanup_s``
    after it was written (Gradio has its own copy by then, under its cache,
    which ``delete_cache`` clears).
    """
    refusal = await _admin_refusal(services, password, request, NOT_AUTHORISED)
    if refusal is not None:
        return gr.update(value=None, visible=False), refusal
    folder = tempfile.mkdtemp(prefix="rlhf-chat-export-")
    paths, message = await asyncio.to_thread(controls.export_feedback, services.sessions, folder)
    remove_later(folder, services.config.ui.cache_cleanup_s)
    return gr.update(value=[str(p) for p in paths], visible=True), message


async def admin_contributors(services: Services, password: str | None, request=None):
    """The contributors table for an admin (an empty update for anyone else)."""
    refusal = await _admin_refusal(services, password, request, NOT_AUTHORISED)
    if refusal is not None:
        return gr.update()
    rows = await asyncio.to_thread(controls.contributors_table, services)
    return gr.update(value=rows or [[""] * len(controls.CONTRIBUTOR_COLUMNS)])


def remove_later(folder: str, after_s: float) -> threading.Timer:
    """Delete ``folder`` after ``after_s`` seconds, on a daemon timer."""
    timer = threading.Timer(after_s, shutil.rmtree, args=(folder,), kwargs={"ignore_errors": True})
    timer.daemon = True
    timer.start()
    return timer


# --- layout ------------------------------------------------------------------------------

CSS = ".pane textarea { font-size: 0.95rem; }"
REFRESH_S = 5.0  # the Training tab's refresh period


PRIVACY_NOTICE = (
    "Your messages and votes are stored and used to train this chatbot. "
    "Do not type anything private. *Delete my data* removes this session's messages and votes."
)


def delete_my_data(services: Services, state: ChatState | None) -> tuple:
    """Remove this session's conversations, pairs and votes from the database, and start afresh."""
    if state is None:
        return view(ChatState(), "Nothing stored for this session yet.")
    if state.writing:
        return view(state, STILL_WRITING)

    def delete() -> int:
        with services.sessions() as session, session.begin():
            return store.delete_session_data(session, state.session_id)

    try:
        removed = store.with_retry(delete)
    except OperationalError:
        return view(state, DB_BUSY + " Nothing was deleted; please try again.")
    return view(ChatState(session_id=state.session_id), f"Deleted this session's data ({removed} rows).")


def _with_request(handler, inputs: list) -> object:
    """The handler as Gradio needs it to pass on its request (for the client's address).

    Gradio finds the request argument by a parameter annotated ``gr.Request``
    and passes it in that position; ``functools.partial`` hides annotations. So
    the wrapper declares one parameter per input, then the request, and calls
    the handler with ``request=``. Generators and coroutines stay what they are.
    """
    fn = handler.func if isinstance(handler, partial) else handler
    if inspect.isgeneratorfunction(fn):
        def wrapper(*args):
            yield from handler(*args[:-1], request=args[-1])
    elif inspect.iscoroutinefunction(fn):
        async def wrapper(*args):
            return await handler(*args[:-1], request=args[-1])
    else:
        def wrapper(*args):
            return handler(*args[:-1], request=args[-1])
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    # The handler's own names for its inputs where it has them, so the API (gradio_client) shows them.
    named = [p.name for p in inspect.signature(handler).parameters.values()
             if p.kind == positional and p.name != "request"]
    names = [named[k] if k < len(named) else f"input_{k}" for k in range(len(inputs))]
    params = [inspect.Parameter(name, positional) for name in names]
    wrapper.__signature__ = inspect.Signature([*params, inspect.Parameter("request", positional, annotation=gr.Request)])
    wrapper.__annotations__ = {"request": gr.Request}
    return wrapper


def build_chat(services: Services) -> None:
    """The chat: conversation, two candidate panes, vote buttons, input."""
    ui = services.config.ui
    state = gr.State(None)
    gr.Markdown(PRIVACY_NOTICE, elem_classes="privacy")
    chatbot = gr.Chatbot(label="Conversation", height=320)
    with gr.Row():
        pane_a = gr.Textbox(label="Response A", lines=8, max_lines=16, interactive=False, elem_classes="pane")
        pane_b = gr.Textbox(label="Response B", lines=8, max_lines=16, interactive=False, elem_classes="pane")
    with gr.Row():
        vote_buttons = {c: gr.Button(label, interactive=False, variant="primary") for c, label in VOTE_LABELS.items()}
    strength = gr.Radio(list(STRENGTH_LABELS), value=None, label="How much better? (optional)")
    with gr.Accordion("Neither is what you wanted? Write a better answer", open=False):
        with gr.Row():
            starts = {side: gr.Button(label, size="sm") for side, label in
                      (("a", "Edit answer A"), ("b", "Edit answer B"), ("", "Write from scratch"))}
        written = gr.Textbox(label="Your answer", lines=5, max_lines=16,
                             max_length=services.config.sampling.max_message_chars)
        started_from = gr.State("")
        submit_written = gr.Button("Submit my answer", variant="primary")
    notice = gr.Markdown("")
    textbox = gr.Textbox(
        label="Your message", placeholder="Type a message and press Enter", max_lines=8,
        max_length=services.config.sampling.max_message_chars,
    )
    with gr.Row():
        send = gr.Button("Send", variant="primary")
        regen = gr.Button("Regenerate", interactive=False)
        more = gr.Button("Continue", interactive=False)
        new = gr.Button("New conversation")
        forget = gr.Button("Delete my data", variant="stop")

    outputs = [chatbot, pane_a, pane_b, notice, textbox, *vote_buttons.values(), regen, more, state]
    # Named endpoints let gradio_client drive the app as a person would. Events
    # that write answers share one concurrency group, bounded so that a crowd
    # waits in Gradio's queue (with its position shown) instead of in threads;
    # the bound still lets ui.batch_people people share one batch, twice over.
    writing = {"concurrency_limit": 2 * ui.batch_people, "concurrency_id": "writing"}
    for trigger, api_name in ((textbox.submit, "respond"), (send.click, False)):
        trigger(_with_request(partial(respond, services), [textbox, state]), [textbox, state], outputs,
                api_name=api_name, **writing)
    regen.click(_with_request(partial(regenerate, services), [state]), [state], outputs, api_name="regenerate", **writing)
    more.click(_with_request(partial(continue_answer, services), [state]), [state], outputs, api_name="continue",
               **writing)
    new.click(partial(new_conversation, services), [state], outputs, api_name="new_conversation")
    forget.click(partial(delete_my_data, services), [state], outputs, api_name="delete_my_data")
    for choice, button in vote_buttons.items():
        button.click(
            _with_request(partial(vote, services, choice), [strength, state]), [strength, state], outputs,
            api_name=f"vote_{choice}",
        ).then(lambda: None, None, strength, api_name=False)
    for side, button in starts.items():
        button.click(partial(start_from, side), [state], [written, started_from], api_name=f"start_from_{side or 'scratch'}")
    submit_written.click(_with_request(partial(submit_demonstration, services), [written, started_from, state]),
                         [written, started_from, state], [*outputs, written], api_name="submit_answer")


def build_training(services: Services) -> tuple[gr.Timer, list, dashboard.ProbeBoard]:
    """The Training tab's components; returns its timer, the outputs of :func:`training_tick`
    and the probe board it reads."""
    loop_md = gr.Markdown("")
    with gr.Row():
        votes = gr.LinePlot(x="time", y="votes", title="Votes collected", height=220)
        # Points, not lines: a round (or an arena bucket) is a sparse, separate measurement.
        accuracy = gr.ScatterPlot(
            x="time", y="accuracy", title="Reward model: held-out accuracy", y_lim=[0, 1], height=220
        )
    with gr.Row():
        reward = gr.LinePlot(x="time", y="mean_reward", title="PPO: mean reward-model score", height=220)
        kl = gr.LinePlot(x="time", y="mean_kl", title="PPO: KL to the reference", height=220)
        version = gr.LinePlot(x="time", y="version", title="Policy version", height=220)
        copy_gap = gr.LinePlot(
            x="time", y="copy_gap", title="Serving vs training copy: |log-prob gap| per token (nats)", height=220
        )
    gr.Markdown(
        "### Arena: the policy against where it started\n"
        "Some pairs in the chat put the current policy against the starting model, blind, on random sides."
    )
    arena = gr.ScatterPlot(
        x="version", y="win_rate", color="series", title="Win-rate against the reference (95% interval)",
        y_lim=[0, 1], height=260,
    )
    arena_md = gr.Markdown("")
    gr.Markdown(
        "### Before and after\nFixed prompts answered greedily by the starting model and by the latest policy "
        "(refreshed at most once a minute when the policy changes)."
    )
    probes = gr.Dataframe(wrap=True, interactive=False, label="Probe prompts")
    gr.Markdown(
        "### What changed\nHow often answers do each thing, the policy against the starting model: from the "
        "newest arena pairs and from the probe answers above."
    )
    behaviours = gr.Dataframe(interactive=False, label="Behaviours: share of answers (words: mean count)")
    modes = gr.Dataframe(
        interactive=False,
        label="Ways of answering people chose (votes between two modes; the pairs show the most chosen more often)",
    )
    events = gr.Markdown("")
    timer = gr.Timer(REFRESH_S, active=False)  # runs only while the tab is open: each tick reads the database
    outputs = [loop_md, votes, accuracy, reward, kl, version, copy_gap, arena, arena_md, events, probes, behaviours, modes]
    board = dashboard.ProbeBoard()
    timer.tick(partial(training_tick, services, board), None, outputs, api_name=False, show_progress="hidden")
    return timer, outputs, board


def build_admin(services: Services) -> None:
    """The admin panel: a password box; the controls appear only for the right password."""
    password = gr.Textbox(label="Admin password", type="password")
    unlock_button = gr.Button("Unlock")
    message = gr.Markdown("")
    with gr.Column(visible=False) as panel:
        with gr.Row():
            pause_button = gr.Button("Pause training")
            resume_button = gr.Button("Resume training")
        with gr.Row():
            beta = gr.Number(value=services.config.ppo.kl_coef, label="β (KL coefficient)", minimum=0)
            beta_button = gr.Button("Set β")
            lr = gr.Number(value=services.config.ppo.learning_rate, label="PPO learning rate")
            lr_button = gr.Button("Set learning rate")
        with gr.Row():
            rollback_to = gr.Dropdown(choices=[], label="Policy checkpoint")
            rollback_button = gr.Button("Roll back to this checkpoint")
            reset_button = gr.Button("Reset the policy to the base model", variant="stop")
        gr.Markdown(
            "**Response modes.** A share of chat pairs shows two answers written in two different modes; "
            "a mode is a set of openings, one per line, that an answer starts with (people see the whole "
            "answer, never the mode's name)."
        )
        with gr.Row():
            mode_list = gr.Dropdown(choices=[], label="Modes in use")
            remove_mode_button = gr.Button("Remove this mode")
        with gr.Row():
            mode_name = gr.Textbox(label="New mode: name", max_length=32)
            mode_description = gr.Textbox(label="What it is for", max_length=500)
            mode_openings = gr.Textbox(label="Openings, one per line", lines=3, max_length=2000)
            mode_behaviour = gr.Dropdown(choices=["", *DETECTORS], value="", label="Behaviour that shows it")
            add_mode_button = gr.Button("Add mode")
        gr.Markdown(
            "**Contributors.** Each session and client address (a salted hash), with how often the reward model "
            "and the others agree with its votes, and what its feedback weighs in training (README, \"Bad actors\"). "
            "Excluding one keeps its votes in the database and the export, marked."
        )
        contributors = gr.Dataframe(headers=controls.CONTRIBUTOR_COLUMNS, interactive=False, wrap=True)
        with gr.Row():
            refresh_contributors = gr.Button("Refresh contributors")
            who = gr.Textbox(label="Contributor (session:KEY or client:KEY)", max_length=80)
            why = gr.Textbox(label="Reason", max_length=200)
            exclude_button = gr.Button("Exclude from training", variant="stop")
            include_button = gr.Button("Include again")
            retrain_button = gr.Button("Retrain the reward model without them")
        export_button = gr.Button("Download preferences and written answers (JSONL)")
        export_file = gr.File(label="Preferences, written answers", file_count="multiple", visible=False, interactive=False)

    unlocked = [panel, message, rollback_to, mode_list]
    mode_inputs = [password, mode_name, mode_description, mode_openings, mode_behaviour]
    unlock_button.click(_with_request(partial(unlock, services), [password]), [password], unlocked, api_name=False)
    password.submit(_with_request(partial(unlock, services), [password]), [password], unlocked, api_name=False)
    add_mode_button.click(
        _with_request(partial(admin_modes, services, controls.add_mode), mode_inputs), mode_inputs, [message, mode_list],
        api_name=False,
    )
    remove_mode_button.click(
        _with_request(partial(admin_modes, services, controls.remove_mode), [password, mode_list]), [password, mode_list],
        [message, mode_list],
        api_name=False,
    )
    for button, action, extra in (
        (pause_button, controls.pause, []),
        (resume_button, controls.resume, []),
        (beta_button, controls.set_kl_coef, [beta]),
        (lr_button, controls.set_learning_rate, [lr]),
        (rollback_button, controls.rollback, [rollback_to]),
        (reset_button, controls.reset_policy, []),
    ):
        inputs = [password, *extra]
        button.click(_with_request(partial(admin_control, services, action), inputs), inputs, [message, rollback_to],
                     api_name=False)
    for button, action, extra in (
        (exclude_button, controls.exclude_contributor, [who, why]),
        (include_button, controls.include_contributor, [who]),
        (retrain_button, controls.retrain_reward, []),
    ):
        inputs = [password, *extra]
        button.click(_with_request(partial(admin_control, services, action), inputs), inputs, [message, rollback_to],
                     api_name=False).then(
            _with_request(partial(admin_contributors, services), [password]), [password], [contributors], api_name=False
        )
    refresh_contributors.click(_with_request(partial(admin_contributors, services), [password]), [password],
                               [contributors], api_name=False)
    export_button.click(_with_request(partial(admin_export, services), [password]), [password], [export_file, message],
                        api_name=False)


def build_demo(services: Services) -> gr.Blocks:
    """Lay out the app and wire its events to the handlers.

    The Admin tab exists only when an admin password is configured
    (``RLHF_CHAT_ADMIN_PASSWORD``): without one, nothing of it is rendered.
    """
    ui = services.config.ui
    # Gradio's cache (its copies of served files) is swept as often as files may live.
    with gr.Blocks(title="rlhf-chat", delete_cache=(ui.cache_cleanup_s, ui.cache_cleanup_s)) as demo:
        gr.Markdown(
            "# rlhf-chat\nChat, compare two answers, pick the better one. "
            "Your votes train a reward model, and PPO teaches the chatbot what people prefer, live."
        )
        gr.Markdown(partial(status_line, services), every=5.0)
        with gr.Tabs():
            with gr.Tab("Chat") as chat_tab:
                build_chat(services)
            with gr.Tab("Training") as training_tab:
                timer, training_outputs, board = build_training(services)
            other_tabs = [chat_tab]
            if services.config.ui.admin_password:
                with gr.Tab("Admin") as admin_tab:
                    build_admin(services)
                other_tabs.append(admin_tab)
        # The timer ticks only while the Training tab is shown, and the tab fills at once when opened.
        training_tab.select(lambda: gr.Timer(active=True), None, timer, api_name=False).then(
            partial(training_tick, services, board), None, training_outputs, api_name=False
        )
        for tab in other_tabs:
            tab.select(lambda: gr.Timer(active=False), None, timer, api_name=False)
    # Events without a group of their own (votes, the Training tab) run as they come;
    # beyond max_size waiting events Gradio tells the newcomer the queue is full.
    demo.queue(default_concurrency_limit=None, max_size=ui.max_waiting)
    return demo


def launch_options(cfg: AppConfig, services: Services | None = None) -> dict:
    """``demo.launch`` arguments that app.py and the benchmarks share: the upload
    limit (the app has no upload field, but Gradio's upload route is open to anyone)
    and, given the services, the ``/health`` route (``health.health``)."""
    options = {"max_file_size": cfg.ui.max_upload_bytes, "css": CSS}
    if services is not None:
        options["app_kwargs"] = {"routes": [health_route(services)]}
    return options
