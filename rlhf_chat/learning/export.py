"""Export: the feedback as datasets, in the layouts TRL's trainers read.

Preferences (reward and DPO trainers): one row per usable vote and two per
written answer (it over each answer it was written beside), marked by
``source``: ``prompt``, ``chosen``, ``rejected`` (strings) and
``chosen_messages`` / ``rejected_messages`` (role/content lists: the context
followed by the answer). Ties and "both bad" carry no preference and are left
out; the caller is told how many.

Demonstrations (SFT trainer): one row per written answer, ``messages`` (the
context followed by the answer), with the candidate it started from.

Every row is exported, including feedback the guards keep out of training
(learning/guards.py): ``excluded`` marks a contributor an admin left out, and a
written answer's ``held_back`` lists why it trains nothing (a link, an address,
a copy); a dataset built from the export can drop them, or study them.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_chat.config import GuardConfig
from rlhf_chat.learning.guards import assess_feedback
from rlhf_chat.learning.preferences import PreferencePair, demonstration_pairs, to_pair
from rlhf_chat.storage import store
from rlhf_chat.text.chat import prompt_text


def preference_rows(session) -> tuple[list[dict], dict[str, int]]:
    """(rows, counts of votes left out by choice): the votes, then the written answers' pairs."""
    rows, skipped = [], {"tie": 0, "both_bad": 0}
    trust = assess_feedback(session, GuardConfig())
    for comparison in store.voted_comparisons(session):
        pair = to_pair(comparison)
        if pair is None:
            skipped[comparison.choice] = skipped.get(comparison.choice, 0) + 1
            continue
        rows.append(_preference_row(pair, bool(comparison.arena), comparison.id in trust.excluded_comparisons))
    demos = store.demonstrations(session)
    held = {d.comparison_id: trust.held_back.get(d.id, []) for d in demos}
    for pair in demonstration_pairs(demos, 1.0):
        row = _preference_row(pair, False, pair.comparison_id in trust.excluded_comparisons)
        rows.append({**row, "held_back": held.get(pair.comparison_id, [])})
    return rows, skipped


def _preference_row(pair: PreferencePair, arena: bool, excluded: bool = False) -> dict:
    return {
        "comparison_id": pair.comparison_id,
        "prompt": prompt_text(pair.context),
        "chosen": pair.chosen,
        "rejected": pair.rejected,
        "chosen_messages": [*pair.context, {"role": "assistant", "content": pair.chosen}],
        "rejected_messages": [*pair.context, {"role": "assistant", "content": pair.rejected}],
        "strength": pair.strength,
        "arena": arena,
        "source": pair.source,
        "excluded": excluded,  # an admin left its contributor out of training; kept here, marked
    }


def demonstration_rows(session) -> list[dict]:
    """The written answers in TRL's conversational SFT layout (``messages``), with the
    guards' marks (``excluded``, ``held_back``)."""
    trust = assess_feedback(session, GuardConfig())
    return [
        {
            "comparison_id": d.comparison_id,
            "messages": [*d.context, {"role": "assistant", "content": d.text}],
            "started_from": d.started_from or None,  # a | b: the candidate edited; None: written from scratch
            "source": "demonstration",
            "excluded": d.comparison_id in trust.excluded_comparisons,
            "held_back": trust.held_back.get(d.id, []),
        }
        for d in store.demonstrations(session)
    ]


def write_rows(rows: list[dict], path: str | Path, fmt: str) -> Path:
    """Write rows as JSON Lines or Parquet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif fmt == "parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path, index=False)
    else:
        raise ValueError(f"unknown format {fmt!r}; use jsonl or parquet")
    return path
