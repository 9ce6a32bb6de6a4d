"""Chat: cleaning what people type, and turning a conversation into prompt tokens.

A conversation is a list of ``{"role": ..., "content": ...}`` messages, the
layout of the tokenizer's chat template, of Gradio's ``type="messages"``
chatbot and of TRL's conversational datasets.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

Message = dict[str, str]


class EmptyMessage(ValueError):
    """The person sent nothing but whitespace and invisible characters."""


@dataclass
class CleanedMessage:
    """A message ready to store, and what to tell the person about changes made to it."""

    text: str
    notice: str = ""  # shown to the person when the text was changed


# Lone surrogates: text that cannot be encoded to UTF-8 (see clean_message).
_SURROGATE = re.compile("[\ud800-\udfff]")
# Format characters (category Cf) are invisible, but these carry meaning in
# ordinary writing and are kept: the zero-width joiner builds emoji sequences
# (family, rainbow flag) and Indic conjuncts, the non-joiner is part of Persian
# spelling, the direction marks keep mixed right-to-left text in order, and the
# Arabic prepended marks are visible signs. Other Cf characters (zero-width
# spaces, BOMs, bidi overrides that make text display in an order other than
# the one stored) are removed.
_KEPT_FORMAT = frozenset(
    "\u200c\u200d\u200e\u200f\u061c"
    "\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891\u08e2\U000110bd\U000110cd"
)
# Subdivision flags (England, Scotland, Wales) spell their region in invisible
# tag characters after a black flag. Anywhere else tag characters are removed:
# they can smuggle text a person never sees into what the model reads.
_TAG_FLAG = re.compile("\U0001f3f4[\U000e0020-\U000e007e]{1,16}\U000e007f")


def _keep(ch: str) -> bool:
    category = unicodedata.category(ch)
    if category == "Cc":  # NUL, escapes, ...: they confuse tokenizers and terminals
        return ch in "\n\t"  # newlines and tabs are part of normal writing
    if category == "Cf":
        return ch in _KEPT_FORMAT
    # Cn (unassigned) is kept: it is also every character newer than this Python's
    # Unicode tables, such as recent emoji. Co (private use) is harmless.
    return True


def _visible(ch: str) -> bool:
    return not ch.isspace() and unicodedata.category(ch) != "Cf"


RAW_CUT_FACTOR = 4  # raw characters kept per character allowed, before normalising


def clean_message(raw: object, max_chars: int) -> CleanedMessage:
    """Normalise a typed message: valid text, no control characters, bounded length.

    Raises :class:`EmptyMessage` for an empty one, including one of nothing but
    invisible characters. An overlong message is cut at ``max_chars`` and the
    notice says so, rather than being refused, so that nothing the person wrote
    up to the limit is lost. Markup such as ``<script>`` stays as typed: it is
    text to the model, and the UI shows it as text.
    """
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")  # invalid UTF-8 becomes U+FFFD, visibly
    text = "" if raw is None else str(raw)
    raw_length = len(text)
    # Cut before the per-character work below, so a megabyte pasted (or posted)
    # costs no more than a message at the limit. Generous: what is dropped below
    # (control characters, invisible ones) must not leave the kept text short.
    text = text[: RAW_CUT_FACTOR * max_chars]
    if _SURROGATE.search(text):
        # Lone surrogates (from JSON such as "\ud800") cannot be encoded to UTF-8 for
        # the database or the tokenizer: each becomes U+FFFD, and a split pair is joined.
        text = text.encode("utf-16-le", errors="surrogatepass").decode("utf-16-le", errors="replace")
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # Windows and old Mac line ends
    pieces, last = [], 0
    for flag in _TAG_FLAG.finditer(text):
        pieces += [ch for ch in text[last : flag.start()] if _keep(ch)]
        pieces.append(flag.group())
        last = flag.end()
    pieces += [ch for ch in text[last:] if _keep(ch)]
    text = "".join(pieces).strip()
    if not any(_visible(ch) for ch in text):
        raise EmptyMessage("Please type a message first.")
    if len(text) > max_chars:
        return CleanedMessage(
            text[:max_chars],
            f"Your message was {max(raw_length, len(text)):,} characters; only the first {max_chars:,} were kept.",
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


def render_response(tokenizer, response: str, finished: bool = True) -> list[int]:
    """Token ids of an assistant answer as the model wrote it: ending with EOS when
    it finished, and without one when it was cut off at the length limit.

    Scorers read the last token's state, so a cut-off answer must end as PPO's
    cut-off rollouts end, on its last word, never on an EOS it did not write.
    """
    ids = tokenizer.encode(response, add_special_tokens=False)
    return ids + [tokenizer.eos_token_id] if finished else ids


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
        if message.get("role") == "user":
            return message.get("content", "")
    return ""
