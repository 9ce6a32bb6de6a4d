"""UI: the Gradio layout. Chat, two candidates side by side, four vote buttons;
a Training tab that shows the loop improving the policy; admin controls.

This module only lays out components and wires their events, in the way of
Gradio's demos: what each event does is a plain function elsewhere, which
tests call directly: the chat tab's in ``handlers``, the Training tab's in
``dashboard``, the Admin tab's in ``admin`` (over ``controls``).
"""

from __future__ import annotations

import inspect
from functools import partial

import gradio as gr

from rlhf_chat.config import AppConfig
from rlhf_chat.serving import admin, controls, dashboard
from rlhf_chat.serving.handlers import (
    STRENGTH_LABELS,
    VOTE_LABELS,
    continue_answer,
    delete_my_data,
    new_conversation,
    regenerate,
    respond,
    start_from,
    status_line,
    submit_demonstration,
    vote,
)
from rlhf_chat.serving.health import health_route
from rlhf_chat.serving.services import Services
from rlhf_chat.text.behaviours import DETECTORS

CSS = ".pane textarea { font-size: 0.95rem; }"
REFRESH_S = 5.0  # the Training tab's refresh period
# A plot's title is cut at its plot's width: four plots share a row of a 1280-pixel
# window, and "Serving vs training copy: |log-prob gap| per token (nats)" lost both
# ends there (issue 42). Titles stay within this many characters (a test reads them).
MAX_TITLE_CHARS = 28

PRIVACY_NOTICE = (
    "Your messages, the answers you saw and your votes are stored in this app's database, with a "
    "salted hash of your address (never the address), and used to train this chatbot; they are kept "
    "until you delete them or the operator resets the database. Do not type anything private. "
    "*Delete my data* removes this session's messages and votes. No usage analytics are sent anywhere."
)


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


# --- the chat ----------------------------------------------------------------------------


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


# --- the Training tab ----------------------------------------------------------------------


def build_training(services: Services) -> tuple[gr.Timer, list, dashboard.ProbeBoard]:
    """The Training tab's components; returns its timer, the outputs of ``dashboard.training_tick``
    and the probe board it reads."""
    loop_md = gr.Markdown("")
    with gr.Row():
        votes = gr.LinePlot(x="time", y="votes", title="Votes collected", height=220)
        # Points, not lines: a round (or an arena bucket) is a sparse, separate measurement.
        accuracy = gr.ScatterPlot(
            x="time", y="accuracy", title="Reward model: held-out acc.", y_lim=[0, 1], height=220
        )
    with gr.Row():
        reward = gr.LinePlot(x="time", y="mean_reward", title="PPO: mean reward score", height=220)
        kl = gr.LinePlot(x="time", y="mean_kl", title="PPO: KL to the start (nats)", height=220)
        version = gr.LinePlot(x="time", y="version", title="Policy version", height=220)
        copy_gap = gr.LinePlot(x="time", y="copy_gap", title="Copy gap (nats per token)", height=220)
    gr.Markdown(
        "*Copy gap*: the mean |log-prob gap| per sampled token between the serving copy, which writes the "
        "answers, and the training copy, which scores them."
    )
    gr.Markdown(
        "### Arena: the policy against where it started\n"
        "Some pairs in the chat put the current policy against the starting model, blind, on random sides."
    )
    arena = gr.ScatterPlot(
        x="version", y="win_rate", color="series", title="Win-rate vs the start (95%)",
        y_lim=[0, 1], height=260,
    )
    arena_md = gr.Markdown("")
    gr.Markdown(
        "### Before and after\nFixed prompts answered by the starting model and by the latest policy as the "
        "chat answers (sampled, one fixed seed, loops stopped; refreshed at most once a minute when the policy "
        "changes)."
    )
    # Fixed shares of the width, wrapped: left to itself the table grew past a 1280-pixel
    # window and cut the policy's column off (issue 42).
    probes = gr.Dataframe(wrap=True, interactive=False, label="Probe prompts", column_widths=["20%", "40%", "40%"])
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
    timer.tick(partial(dashboard.training_tick, services, board), None, outputs, api_name=False, show_progress="hidden")
    return timer, outputs, board


# --- the Admin tab -------------------------------------------------------------------------
# Every admin event takes the password and the request (admin.py checks both on the
# server) and has no API endpoint: gradio_client should not list what only an admin may do.


def _admin_click(trigger, handler, inputs: list, outputs: list):
    """Wire one admin event to ``handler`` (given the request, without an API endpoint)."""
    return trigger(_with_request(handler, inputs), inputs, outputs, api_name=False)


def _admin_training(services: Services, password: gr.Textbox, message: gr.Markdown) -> gr.Dropdown:
    """Pause and resume, β and the learning rate, roll back and reset; returns the checkpoint list."""
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
    for button, action, extra in (
        (pause_button, controls.pause, []),
        (resume_button, controls.resume, []),
        (beta_button, controls.set_kl_coef, [beta]),
        (lr_button, controls.set_learning_rate, [lr]),
        (rollback_button, controls.rollback, [rollback_to]),
        (reset_button, controls.reset_policy, []),
    ):
        _admin_click(button.click, partial(admin.admin_control, services, action), [password, *extra],
                     [message, rollback_to])
    return rollback_to


def _admin_modes(services: Services, password: gr.Textbox, message: gr.Markdown) -> gr.Dropdown:
    """Add and remove response modes; returns the list of modes in use."""
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
    _admin_click(add_mode_button.click, partial(admin.admin_modes, services, controls.add_mode),
                 [password, mode_name, mode_description, mode_openings, mode_behaviour], [message, mode_list])
    _admin_click(remove_mode_button.click, partial(admin.admin_modes, services, controls.remove_mode),
                 [password, mode_list], [message, mode_list])
    return mode_list


def _admin_contributors(services: Services, password: gr.Textbox, message: gr.Markdown,
                        rollback_to: gr.Dropdown) -> None:
    """The contributors table; exclude, include again, retrain the reward model without them."""
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
    show_table = partial(admin.admin_contributors, services)
    for button, action, extra in (
        (exclude_button, controls.exclude_contributor, [who, why]),
        (include_button, controls.include_contributor, [who]),
        (retrain_button, controls.retrain_reward, []),
    ):
        event = _admin_click(button.click, partial(admin.admin_control, services, action), [password, *extra],
                             [message, rollback_to])
        _admin_click(event.then, show_table, [password], [contributors])  # the table shows the change
    _admin_click(refresh_contributors.click, show_table, [password], [contributors])


def build_admin(services: Services) -> None:
    """The admin panel: a password box; the controls appear only for the right password."""
    password = gr.Textbox(label="Admin password", type="password")
    unlock_button = gr.Button("Unlock")
    message = gr.Markdown("")
    with gr.Column(visible=False) as panel:
        rollback_to = _admin_training(services, password, message)
        mode_list = _admin_modes(services, password, message)
        _admin_contributors(services, password, message, rollback_to)
        export_button = gr.Button("Download preferences and written answers (JSONL)")
        export_file = gr.File(label="Preferences, written answers", file_count="multiple", visible=False, interactive=False)
    _admin_click(export_button.click, partial(admin.admin_export, services), [password], [export_file, message])
    for trigger in (unlock_button.click, password.submit):
        _admin_click(trigger, partial(admin.unlock, services), [password], [panel, message, rollback_to, mode_list])


# --- the app -------------------------------------------------------------------------------


def build_demo(services: Services) -> gr.Blocks:
    """Lay out the app and wire its events to the handlers.

    The Admin tab exists only when an admin password is configured
    (``RLHF_CHAT_ADMIN_PASSWORD``): without one, nothing of it is rendered.
    """
    ui = services.config.ui
    # Gradio's cache (its copies of served files) is swept as often as files may live.
    blocks = dict(title="rlhf-chat", delete_cache=(ui.cache_cleanup_s, ui.cache_cleanup_s), analytics_enabled=ui.analytics)
    with gr.Blocks(**blocks) as demo:
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
            partial(dashboard.training_tick, services, board), None, training_outputs, api_name=False
        )
        for tab in other_tabs:
            tab.select(lambda: gr.Timer(active=False), None, timer, api_name=False)
    # Events without a group of their own (votes, the Training tab) run as they come;
    # beyond max_size waiting events Gradio tells the newcomer the queue is full.
    demo.queue(default_concurrency_limit=None, max_size=ui.max_waiting)
    return demo


def launch_options(cfg: AppConfig, services: Services | None = None) -> dict:
    """``demo.launch`` arguments that app.py and the benchmarks share: the upload
    limit (the app has no upload field, but Gradio's upload route is open to anyone),
    the sessions whose state stays in memory (``ui.max_sessions``: the least recently
    used go first, so the state of people who left is bounded) and, given the
    services, the ``/health`` route (``health.health``)."""
    options = {"max_file_size": cfg.ui.max_upload_bytes, "css": CSS, "state_session_capacity": cfg.ui.max_sessions}
    if services is not None:
        options["app_kwargs"] = {"routes": [health_route(services)]}
    return options
