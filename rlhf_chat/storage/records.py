"""Records: what generation hands the store to keep, as plain fields (no model, no session)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Candidate:
    """One answer shown to a person, with what is needed to reproduce and learn from it."""

    text: str
    source: str  # "policy" or "reference"
    policy_version: int
    seed: int
    temperature: float
    top_p: float
    max_new_tokens: int
    token_count: int
    finished: bool
    latency_s: float
    mode: str = ""  # the response mode it was written in (modes.py); "" for a plain answer. Never shown.

    def to_record(self) -> dict:
        """Plain fields for the store."""
        return asdict(self)
