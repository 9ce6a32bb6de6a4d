"""UI: the Gradio app. Chat, two candidates side by side, four vote buttons;
a Training tab that shows the loop improving the policy; admin controls.

The handlers are plain functions over a per-browser :class:`ChatState`, so
tests call them directly; :func:`build_demo` only lays out components and wires
events. Every use of the model goes through the model worker.
"""

from __future__ import annotations

import logging
import queue
import random
import secrets
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import gradio as gr
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from rlhf_chat import controls, dashboard, store
from rlhf_chat.candidates import Sampling, sample
from rlhf_chat.behaviours import DETECTORS
from rlhf_chat.modes import active_modes, mode_record_for, modes_for_pair
from rlhf_chat.chat import EmptyMessage, clean_message, render_prompt, trim_to_budget, with_system_prompt
from rlhf_chat.config import AppConfig
from rlhf_chat.batcher import PairBatcher, PairRequest
from rlhf_chat.worker import CHAT, ModelWorker

log = logging.getLogger(__name__)

DB_BUSY = "The database is busy right now (we retried for a few seconds)."
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

    def __post_init__(self) -> None:
        if self.batcher is None:
            ui = self.config.ui
            self.batcher = PairBatcher(self.worker, self.config.sampling, ui.batch_people, ui.batch_wait_s)

    def stop(self) -> None:
        """Stop training, then the worker (each after the slice under way)."""
        if self.loop is not None:
            self.loop.stop()
        self.worker.stop()


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
    vote_times: list[float] = field(default_factory=list)


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
    if worker.load_error is not None:
        return f"**The model failed to load:** {worker.load_error}"
    if not worker.ready.is_set():
        return "Loading the model..."
    with services.sessions() as session:
        votes = store.count_votes(session)
    loop_state = getattr(services.loop, "state_text", lambda: "")()
    parts = [f"Policy version **{worker.serving_version}**", f"votes collected: **{votes}**"]
    if loop_state:
        parts.append(loop_state)
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
    """Stream two candidates for the current history into the panes, then store the pair."""
    updates: queue.Queue = queue.Queue()
    cfg = services.config
    arena = services.worker.serving_version > 0 and random.random() < cfg.loop.arena_fraction
    pair_modes = None if arena else _draw_modes(services)
    history = list(state.history)  # what this pair answers, whatever the session does meanwhile

    def build(tokenizer) -> tuple[list[dict], list[int]]:
        context = _context_for(services, history, tokenizer)
        return context, render_prompt(tokenizer, context)

    future = services.batcher.submit(PairRequest(build, arena, pair_modes, updates.put))
    panes = ("", "")
    while not future.done():
        try:
            panes = tuple(updates.get(timeout=0.1))  # type: ignore[assignment]
            while not updates.empty():  # skip to the newest text
                panes = tuple(updates.get_nowait())  # type: ignore[assignment]
            yield view(state, notice or "Writing two answers...", generating=True, panes=panes, clear_input=clear_input)
        except queue.Empty:
            continue
    try:
        context, a, b = future.result()
    except Exception as exc:  # the message is stored; the person can press Regenerate
        log.exception("generation failed")
        state.phase = "regenerate" if state.history else "chat"
        yield view(state, f"Sorry, generating failed ({exc}). Press Regenerate to try again.", clear_input=clear_input)
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
            ).id

    try:
        state.pair_id = store.with_retry(save)
    except OperationalError:
        state.phase = "regenerate"
        yield view(state, DB_BUSY + " The two answers could not be stored; press Regenerate.", clear_input=clear_input)
        return
    state.pair = (a.text, b.text)
    state.pair_finished = (a.finished, b.finished)
    state.phase = "vote"
    yield view(state, f"{notice} Which answer is better?".strip(), clear_input=clear_input)


def respond(services: Services, message: str, state: ChatState | None) -> Iterator[tuple]:
    """A person sent a message: store it, then stream two candidates."""
    state = state or ChatState()
    if state.phase != "chat":
        yield view(state, "Please vote on the two answers first (or press Regenerate).")
        return
    try:
        cleaned = clean_message(message, services.config.sampling.max_message_chars)
    except EmptyMessage as exc:
        yield view(state, str(exc))
        return

    def save() -> int:
        with services.sessions() as session, session.begin():
            conversation_id = state.conversation_id or store.start_conversation(session, state.session_id).id
            store.add_message(session, conversation_id, "user", cleaned.text)
            return conversation_id  # adopted only once committed

    try:
        state.conversation_id = store.with_retry(save)
    except OperationalError:  # nothing stored: the message stays in the box to send again
        yield view(state, DB_BUSY + " Your message was not sent; please send it again.")
        return
    state.history.append({"role": "user", "content": cleaned.text})
    state.pair, state.pair_id, state.answer_message_id = ("", ""), None, None
    yield view(state, cleaned.notice or "Writing two answers...", generating=True, clear_input=True)
    yield from _generate(services, state, clear_input=True, notice=cleaned.notice)


def regenerate(services: Services, state: ChatState | None) -> Iterator[tuple]:
    """Two new candidates for the same context; the old pair can no longer be voted on."""
    state = state or ChatState()
    if not state.history or state.history[-1]["role"] != "user":
        yield view(state, "Send a message first.")
        return
    state.pair, state.pair_id = ("", ""), None
    yield from _generate(services, state)


def vote(
    services: Services, choice: str, strength_label: str | None, state: ChatState | None, pair_id: int | None = None
) -> tuple:
    """Store a vote, then continue the conversation with the chosen answer.

    ``pair_id`` is the pair the person saw; by default the one in the state.
    The vote is committed before this returns, so what the UI shows as
    recorded is in the database.
    """
    state = state or ChatState()
    target = state.pair_id if pair_id is None else pair_id
    if target is None or state.phase != "vote":
        return view(state, "There is no pair to vote on right now.")
    if _over_rate_limit(services, state):
        return view(state, "You are voting very fast; please wait a few seconds and read the answers.")
    strength = STRENGTH_LABELS.get(strength_label or "")

    side = 1 if choice == "b" else 0  # a tie continues with A
    chosen = state.pair[side]

    def save() -> tuple[store.VoteResult, int | None]:
        with services.sessions() as session, session.begin():
            result = store.record_vote(session, target, choice, strength, state.session_id)
            if result.ok and choice != "both_bad":
                return result, store.add_message(session, state.conversation_id, "assistant", chosen).id
            return result, None

    try:
        result, message_id = store.with_retry(save)
    except OperationalError:  # not stored, so not acknowledged: the person can click again
        return view(state, DB_BUSY + " Your vote was not saved; please click again.")
    if not result.ok:
        return view(state, result.message)
    state.vote_times.append(time.monotonic())
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


def continue_answer(services: Services, state: ChatState | None) -> Iterator[tuple]:
    """Write on where the chosen, cut-off answer stopped, streamed into the conversation.

    The continuation becomes part of that answer, on screen, in the stored
    conversation and in the context of what follows. It is the serving
    policy writing on; it is not a candidate and nobody votes on it.
    """
    state = state or ChatState()
    if not can_continue(state):
        yield view(state, "There is no cut-off answer to continue.")
        return
    turn = len(state.history) - 1
    before = state.history[turn]["content"]
    updates: queue.Queue = queue.Queue()
    sampling = Sampling.from_config(services.config.sampling, secrets.randbelow(2**31))

    def job(models):
        context = _context_for(services, state.history, models.tokenizer)
        return continue_text(models.serving, models.tokenizer, context, sampling, updates.put)

    future = services.worker.submit(CHAT, job)
    shown = shown_history(state)
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
    try:
        added, finished = future.result()
    except Exception as exc:  # the answer stays as it was; the person can press Continue again
        log.exception("continuing failed")
        yield view(state, f"Sorry, continuing failed ({exc}). Press Continue to try again.")
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
    fresh = ChatState(session_id=state.session_id if state else uuid.uuid4().hex)
    if state:
        fresh.vote_times = state.vote_times
    return view(fresh, "New conversation started.")


def _over_rate_limit(services: Services, state: ChatState) -> bool:
    now = time.monotonic()
    state.vote_times[:] = [t for t in state.vote_times if now - t < 60.0]
    return len(state.vote_times) >= services.config.ui.votes_per_minute


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
    return (*dashboard.refresh(services.sessions, services.loop), dashboard.probe_table(probes), behaviours, modes)


# --- admin -------------------------------------------------------------------------------

WRONG_PASSWORD_DELAY_S = 1.0  # slows password guessing to one try a second per connection


def unlock(services: Services, password: str | None) -> tuple:
    """Show the admin controls for the right password: (panel, message, rollback choices, mode choices)."""
    if not controls.check_admin(password, services.config):
        time.sleep(WRONG_PASSWORD_DELAY_S)
        return gr.update(visible=False), "Wrong password.", gr.update(), gr.update()
    return gr.update(visible=True), "Unlocked.", _rollback_choices(services), _mode_choices(services)


def _mode_choices(services: Services):
    return gr.update(choices=controls.mode_names(services.sessions), value=None)


def admin_modes(services: Services, action, password: str | None, *args) -> tuple:
    """Add or remove a response mode for an admin: (message, the modes now in use)."""
    message, _ = admin_control(services, action, password, *args)
    if not controls.check_admin(password, services.config):
        return message, gr.update()
    return message, _mode_choices(services)


def _rollback_choices(services: Services):
    versions = controls.policy_versions(services.sessions)
    return gr.update(choices=versions, value=versions[0] if versions else None)


def admin_control(services: Services, action, password: str | None, *args) -> tuple:
    """Run one control for an admin: (message, rollback choices).

    The password is checked here, on the server, on every call: hidden
    components are only hidden in the browser, and anyone can send an event.
    """
    if not controls.check_admin(password, services.config):
        time.sleep(WRONG_PASSWORD_DELAY_S)
        return "Not authorised: enter the admin password first.", gr.update()
    try:
        message = action(services, *args)
    except controls.ControlError as exc:
        return str(exc), gr.update()
    except Exception as exc:  # shown to the admin; the chat is unaffected
        log.exception("admin control failed")
        return f"Failed: {type(exc).__name__}: {exc}", gr.update()
    return message, _rollback_choices(services)


def admin_export(services: Services, password: str | None) -> tuple:
    """Write the preferences as JSON Lines for download: (file, message)."""
    if not controls.check_admin(password, services.config):
        time.sleep(WRONG_PASSWORD_DELAY_S)
        return gr.update(value=None, visible=False), "Not authorised: enter the admin password first."
    path, message = controls.export_preferences(services.sessions, tempfile.mkdtemp(prefix="rlhf-chat-export-"))
    return gr.update(value=str(path), visible=True), message


# --- layout ------------------------------------------------------------------------------

CSS = ".pane textarea { font-size: 0.95rem; }"
REFRESH_S = 5.0  # the Training tab's refresh period


def build_chat(services: Services) -> None:
    """The chat: conversation, two candidate panes, vote buttons, input."""
    state = gr.State(None)
    chatbot = gr.Chatbot(label="Conversation", height=320)
    with gr.Row():
        pane_a = gr.Textbox(label="Response A", lines=8, max_lines=16, interactive=False, elem_classes="pane")
        pane_b = gr.Textbox(label="Response B", lines=8, max_lines=16, interactive=False, elem_classes="pane")
    with gr.Row():
        vote_buttons = {c: gr.Button(label, interactive=False, variant="primary") for c, label in VOTE_LABELS.items()}
    strength = gr.Radio(list(STRENGTH_LABELS), value=None, label="How much better? (optional)")
    notice = gr.Markdown("")
    textbox = gr.Textbox(label="Your message", placeholder="Type a message and press Enter", max_lines=8)
    with gr.Row():
        send = gr.Button("Send", variant="primary")
        regen = gr.Button("Regenerate", interactive=False)
        more = gr.Button("Continue", interactive=False)
        new = gr.Button("New conversation")

    outputs = [chatbot, pane_a, pane_b, notice, textbox, *vote_buttons.values(), regen, more, state]
    # Named endpoints let gradio_client drive the app as a person would.
    for trigger, api_name in ((textbox.submit, "respond"), (send.click, False)):
        trigger(partial(respond, services), [textbox, state], outputs, api_name=api_name)
    regen.click(partial(regenerate, services), [state], outputs, api_name="regenerate")
    more.click(partial(continue_answer, services), [state], outputs, api_name="continue")
    new.click(partial(new_conversation, services), [state], outputs, api_name="new_conversation")
    for choice, button in vote_buttons.items():
        button.click(
            partial(vote, services, choice), [strength, state], outputs, api_name=f"vote_{choice}"
        ).then(lambda: None, None, strength, api_name=False)


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
        export_button = gr.Button("Download preferences (JSONL)")
        export_file = gr.File(label="Preferences", visible=False, interactive=False)

    unlocked = [panel, message, rollback_to, mode_list]
    unlock_button.click(partial(unlock, services), [password], unlocked, api_name=False)
    password.submit(partial(unlock, services), [password], unlocked, api_name=False)
    add_mode_button.click(
        partial(admin_modes, services, controls.add_mode),
        [password, mode_name, mode_description, mode_openings, mode_behaviour], [message, mode_list], api_name=False,
    )
    remove_mode_button.click(
        partial(admin_modes, services, controls.remove_mode), [password, mode_list], [message, mode_list],
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
        button.click(partial(admin_control, services, action), [password, *extra], [message, rollback_to],
                     api_name=False)
    export_button.click(partial(admin_export, services), [password], [export_file, message], api_name=False)


def build_demo(services: Services) -> gr.Blocks:
    """Lay out the app and wire its events to the handlers.

    The Admin tab exists only when an admin password is configured
    (``RLHF_CHAT_ADMIN_PASSWORD``): without one, nothing of it is rendered.
    """
    with gr.Blocks(title="rlhf-chat") as demo:
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
    demo.queue(default_concurrency_limit=None)
    return demo
