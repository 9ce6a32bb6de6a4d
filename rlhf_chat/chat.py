"""Chat: cleaning what people type, and turning a conversation into prompt tokens.

A conversation is a list of ``{"role": ..., "content": ...}`` messages, the
layout of the tokenizer's chat template, of Gradio's ``type="messages"``
chatbot and of TRL's conversational datasets.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

Message = dict[str, str]


class EmptyMessage(ValueError):
    """The person sent nothing but whitespace."""


@dataclass
class CleanedMessage:
    text: str
    notice: str = ""  # shown to the person when the text was changed


def clean_message(raw: object, max_chars: int) -> CleanedMessage:
    """Normalise a typed message: valid text, no control characters, bounded length.

    Raises :class:`EmptyMessage` for an empty one. An overlong message is cut at
    ``max_chars`` and the notice says so, rather than being refused, so that
    nothing the person wrote up to the limit is lost.
    """
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")  # invalid UTF-8 becomes U+FFFD, visibly
    text = "" if raw is None else str(raw)
    text = unicodedata.normalize("NFC", text)
    # Control characters (NUL, escapes, ...) confuse tokenizers and terminals;
    # newlines and tabs are part of normal writing.
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    text = text.strip()
    if not text:
        raise EmptyMessage("Please type a message first.")
    if len(text) > max_chars:
        return CleanedMessage(
            text[:max_chars],
            f"Your message was {len(text):,} characters; only the first {max_chars:,} were kept.",
        )
    return CleanedMessage(text)


def with_system_prompt(messages: list[Message], system_prompt: str) -> list[Message]:
    """Prepend a system message when one is configured (else the template's default)."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


def render_prompt(tokenizer, messages: list[Message]) -> list[int]:
    """Token ids of the conversation followed by the assistant's turn opening."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def render_response(tokenizer, response: str) -> list[int]:
    """Token ids of an assistant answer as the model would have written it, ending with EOS."""
    return tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]


def trim_to_budget(tokenizer, messages: list[Message], budget: int) -> list[Message]:
    """Drop the oldest turns until the prompt fits in ``budget`` tokens.

    A system message and the newest user message are always kept, so the model
    always answers what was just asked, even if that alone is over budget.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while len(turns) > 1 and len(render_prompt(tokenizer, system + turns)) > budget:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":  # start on a user turn
            turns = turns[1:]
    return system + turns


def prompt_text(messages: list[Message]) -> str:
    """The last user message: what a labeler or an export calls "the prompt"."""
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    return ""
