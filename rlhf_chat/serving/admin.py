"""Admin handlers: the Admin tab's events, between the browser and ``controls``.

``controls`` holds what an admin may do, as plain functions that know nothing
of Gradio; these handlers check the password on the server on every call
(hidden components are only hidden in the browser, and anyone can send an
event), count wrong guesses per address, run the control in a thread, and turn
what it returns into the tab's outputs.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading

import gradio as gr

from rlhf_chat.serving import controls, dashboard
from rlhf_chat.serving.services import Services

log = logging.getLogger(__name__)

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
