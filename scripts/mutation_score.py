"""Mutation score per module from ``mutmut results --all true`` (read on stdin).

    mutmut results --all true | python scripts/mutation_score.py

Killed and timed-out mutants count as caught; "no tests" mutants (a function
no fast test runs) count as not caught, and are shown apart.
"""

from __future__ import annotations

import collections
import re
import sys


def main() -> None:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in sys.stdin:
        name, sep, status = line.strip().rpartition(": ")
        if not sep or "__mutmut_" not in name:
            continue
        match = re.match(r"(.+?)\.x[_\u01c1]", name)  # rlhf_chat.learning.ppo.x_fn__mutmut_1, rlhf_chat.learning.ppo.xǁClassǁmethod__...
        module = match.group(1) if match else name
        counts[module][status.strip()] += 1
    print(f"{'module':28} {'mutants':>7} {'caught':>7} {'survived':>8} {'no tests':>8} {'score':>6} {'score (tested)':>14}")
    total = collections.Counter()
    for module in sorted(counts):
        c = counts[module]
        total.update(c)
        print(row(module, c))
    print(row("all", total))


def row(module: str, c: collections.Counter) -> str:
    n = sum(c.values())
    caught = c["killed"] + c["timeout"]
    untested = c["no tests"]
    tested = n - untested
    return (f"{module:28} {n:7d} {caught:7d} {c['survived']:8d} {untested:8d} "
            f"{caught / max(1, n):6.2f} {caught / max(1, tested):14.2f}")


if __name__ == "__main__":
    main()
