"""Export: `python -m rlhf_chat export` writes the votes in TRL's preference layout,
readable by pandas, one row per usable vote, ties and both-bad counted on stderr."""

from __future__ import annotations

import pandas as pd
import pytest

from rlhf_chat import cli
from rlhf_chat.generation.candidates import Candidate
from rlhf_chat.serving.controls import export_feedback
from rlhf_chat.storage import store

CONTEXT = [
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "Apple."},
    {"role": "user", "content": "Another one, « please »?"},
]


def candidate(text: str) -> Candidate:
    return Candidate(text, "policy", 0, 0, 0.8, 0.95, 16, 3, True, 0.1)


@pytest.fixture
def db(tmp_path):
    """A database with votes a, b (clearly), tie, both_bad and one pair never voted on;
    returns (url, {comparison id: (choice, answer A, answer B)} of the votes)."""
    url = f"sqlite:///{tmp_path / 'votes.db'}"
    sessions = store.open_store(url)
    votes = {}
    with sessions() as session, session.begin():
        for i, (choice, strength) in enumerate(
            [("a", None), ("b", "clearly"), ("tie", None), ("both_bad", None), (None, None), ("b", "slightly")]
        ):
            a, b = f"Banana {i}.", f"Cherry {i}, ñ."
            pair = store.save_pair(session, session_id="s", context=CONTEXT, a=candidate(a), b=candidate(b))
            if choice is not None:
                assert store.record_vote(session, pair.id, choice, strength).ok
                votes[pair.id] = (choice, a, b)
    return url, votes


def expected_rows(votes: dict) -> dict[int, tuple[str, str]]:
    """comparison id -> (chosen, rejected) for every a/b vote."""
    return {cid: ((a, b) if c == "a" else (b, a)) for cid, (c, a, b) in votes.items() if c in ("a", "b")}


def run_export(url: str, fmt: str, out) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--db", url, "--format", fmt, "--out", str(out)])
    assert exit_info.value.code == 0


def check_frame(frame: pd.DataFrame, votes: dict) -> None:
    want = expected_rows(votes)
    assert len(frame) == len(want) == 3  # one for one with the a/b votes, nothing else
    assert sorted(frame["comparison_id"].tolist()) == sorted(want)
    for row in frame.to_dict("records"):
        chosen, rejected = want[row["comparison_id"]]
        assert (row["prompt"], row["chosen"], row["rejected"]) == ("Another one, « please »?", chosen, rejected)
        assert list(row["chosen_messages"]) == [*CONTEXT, {"role": "assistant", "content": chosen}]
        assert list(row["rejected_messages"]) == [*CONTEXT, {"role": "assistant", "content": rejected}]


def test_jsonl_export_matches_the_votes_and_counts_what_was_left_out(db, tmp_path, capsys):
    url, votes = db
    out = tmp_path / "out" / "prefs.jsonl"
    run_export(url, "jsonl", out)
    frame = pd.read_json(out, lines=True)
    check_frame(frame, votes)
    assert frame.set_index("comparison_id").loc[2, "strength"] == "clearly"
    err = capsys.readouterr().err
    assert "wrote 3 preferences" in err and "left out 1 ties and 1 both-bad" in err


def test_parquet_export_matches_the_votes(db, tmp_path):
    pytest.importorskip("pyarrow", reason="Parquet needs pyarrow")
    url, votes = db
    out = tmp_path / "prefs.parquet"
    run_export(url, "parquet", out)
    frame = pd.read_parquet(out)
    # Parquet stores lists of structs: turn them back into plain lists of dicts to compare
    for column in ("chosen_messages", "rejected_messages"):
        frame[column] = frame[column].map(lambda messages: [dict(m) for m in messages])
    check_frame(frame, votes)


def test_admin_download_writes_the_same_rows(db, tmp_path):
    url, votes = db
    (path, written), message = export_feedback(store.open_store(url), tmp_path)
    check_frame(pd.read_json(path, lines=True), votes)
    assert written.name == "demonstrations.jsonl" and written.read_text() == ""
    assert message == "3 preferences (0 from written answers); left out 1 ties and 1 both-bad votes. 0 written answers."


def test_empty_database_exports_an_empty_file(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    out = tmp_path / "empty.jsonl"
    run_export(url, "jsonl", out)
    assert out.read_text() == "" and "wrote 0 preferences" in capsys.readouterr().err
