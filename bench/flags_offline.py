"""The guards' flag on stored answer pairs, relabelled by a scripted crowd: who is flagged (issue 41).

    python bench/flags_offline.py RUN.db [RUN.db ...] [--votes 200] [--share 0.3] [--people 20] [--seeds 0 1]

Reads the answer pairs (prompt, both answers, finished flags) of earlier runs'
databases, then, for each case, has a crowd vote on ``--votes`` of them drawn
at random, as the simulation's crowd votes (``simulate.Crowd``: the honest
labeler's people, the adversary's sessions and addresses), and runs the
guards' agreement table on the decided votes: no model, no training, seconds.
It prints, per case, how many honest contributors were flagged, and each
adversary contributor with its votes, agreement with the others' consensus,
scored votes and flag. What it cannot show: how the loop trains under those
weights (the simulation does that).
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3

import common  # noqa: F401  (puts the repository on the path)

from rlhf_chat.evaluation.labelers import load_labeler, normalize_choice
from rlhf_chat.evaluation.simulate import ADVERSARY, Crowd, load_adversary
from rlhf_chat.learning.consensus import vote_features
from rlhf_chat.learning.guards import GuardRules, Vote, agreement_table

CASES = [  # (honest labeler, adversary or None, adversary sessions, adversary addresses, noise)
    (honest, adversary, sessions, addresses, 0.0 if adversary else 0.25)
    for honest in ("concise", "follow_up")
    for adversary, sessions, addresses in [(None, 1, 1)] + [
        (kind, k, a) for kind in ("reversed", "longer", "shorter") for k, a in ((1, 1), (10, 1), (10, 10))]
]


def stored_pairs(paths: list[str]) -> list[tuple[str, str, str, bool, bool]]:
    """(prompt, answer A, answer B, A finished, B finished) of every pair in the databases."""
    pairs = []
    for path in paths:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        finished = {(cid, side): bool(f) for cid, side, f in db.execute("select comparison_id, side, finished from candidates")}
        for cid, context, a, b in db.execute("select id, context, response_a, response_b from comparisons"):
            pairs.append((json.loads(context)[-1]["content"], a, b, finished.get((cid, "a"), True),
                          finished.get((cid, "b"), True)))
    return pairs


def crowd_votes(pairs, honest_spec: str, adversary_spec: str | None, crowd: Crowd, votes: int, share: float,
                noise: float, rng: random.Random) -> list[Vote]:
    """The decided votes of ``votes`` pairs drawn from ``pairs``, shown in random order:
    the adversary's on a share ``share``, the honest people's (``noise`` of their decided
    votes flipped at random, as AlpacaFarm's noisy annotators) on the rest."""
    honest = load_labeler(honest_spec)
    adversary = load_adversary(adversary_spec, honest) if adversary_spec else None
    flip = {"a": "b", "b": "a"}
    out = []
    for i in range(votes):
        prompt, a, b, fa, fb = rng.choice(pairs)
        if rng.random() < 0.5:
            a, b, fa, fb = b, a, fb, fa
        bad = adversary is not None and rng.random() < share
        session, client = crowd.adversary() if bad else crowd.honest()
        choice = normalize_choice((adversary if bad else honest)(prompt, a, b))
        if not bad and choice in flip and rng.random() < noise:
            choice = flip[choice]
        if choice in flip:  # ties and "both bad" are never judged
            features = vote_features(prompt, *((a, b, fa, fb) if choice == "a" else (b, a, fb, fa)))
            out.append(Vote(i, session, client, prompt, False, None, None, features))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("databases", nargs="+")
    parser.add_argument("--votes", type=int, default=200)
    parser.add_argument("--share", type=float, default=0.3)
    parser.add_argument("--people", type=int, default=20, help="honest people (simulation.people's default: 20)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    pairs = stored_pairs(args.databases)
    print(f"{len(pairs)} stored pairs; {args.votes} votes a case, the adversary's share {args.share}")
    for seed in args.seeds:
        for honest, adversary, sessions, addresses, noise in CASES:
            people = args.people
            crowd = Crowd("bench", people, sessions, addresses, "bench", seed)
            votes = crowd_votes(pairs, honest, adversary, crowd, args.votes, args.share, noise, random.Random(seed))
            table = agreement_table(votes, {}, set(), GuardRules())
            theirs = {key for v in votes if ADVERSARY in v.session for key in (v.session, v.client)}
            bad = [c for c in table.values() if c.key in theirs]
            good = [c for c in table.values() if c.key not in theirs]
            shown = " ".join(
                f"{c.kind}:{c.votes}v:{'-' if c.consensus_agreement is None else f'{c.consensus_agreement:.2f}'}"
                f"/{c.consensus_scored}{' FLAGGED' if c.flagged else ''}" for c in bad if c.votes >= 10 or c.flagged)
            print(f"seed {seed} {honest:9} {adversary or 'none':8} people {people} adversary {sessions}x{addresses} "
                  f"noise {noise}: honest flagged {sum(c.flagged for c in good)} of {len(good)}; "
                  f"adversary {sum(c.flagged for c in bad)} of {len(bad)} flagged; {shown}")


if __name__ == "__main__":
    main()
