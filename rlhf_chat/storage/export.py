"""Export: votes as a preference dataset, in the layout TRL's reward and DPO trainers read.

One row per usable vote: ``prompt``, ``chosen``, ``rejected`` (strings) and
``chosen_messages`` / ``rejected_messages`` (role/content lists: the context
followed by the answer). Ties and "both bad" carry no preference and are left
out; the caller is told how many.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_chat.learning.preferences import to_pair
from rlhf_chat.serving.chat import prompt_text
from rlhf_chat.storage import store


def preference_rows(session) -> tuple[list[dict], dict[str, int]]:
    """(rows, counts of votes left out by choice)."""
    rows, skipped = [], {"tie": 0, "both_bad": 0}
    for comparison in store.voted_comparisons(session):
        pair = to_pair(comparison)
        if pair is None:
            skipped[comparison.choice] = skipped.get(comparison.choice, 0) + 1
            continue
        rows.append(
            {
                "comparison_id": pair.comparison_id,
                "prompt": prompt_text(pair.context),
                "chosen": pair.chosen,
                "rejected": pair.rejected,
                "chosen_messages": [*pair.context, {"role": "assistant", "content": pair.chosen}],
                "rejected_messages": [*pair.context, {"role": "assistant", "content": pair.rejected}],
                "strength": pair.strength,
                "arena": bool(comparison.arena),
            }
        )
    return rows, skipped


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
