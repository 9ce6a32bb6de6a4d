"""Command-line tools: train-reward, train-policy, simulate, export.

    python -m rlhf_chat train-reward [--db URL]
    python -m rlhf_chat train-policy --steps K [--db URL]
    python -m rlhf_chat simulate --labeler NAME_OR_MODULE:CALLABLE [--comparisons N] [--ppo-steps K]
        [--people N] [--adversary reversed|longer|shorter|SPEC --adversary-sessions K --adversary-addresses A]
        [--label-noise P] ...
    python -m rlhf_chat export --format jsonl|parquet [--out PATH] [--demonstrations-out PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rlhf_chat.config import AppConfig, add_common_args, config_from_args


def _start_worker(cfg: AppConfig):
    from rlhf_chat.generation.worker import ModelWorker
    from rlhf_chat.runtime import load_for_serving
    from rlhf_chat.storage.store import open_store

    sessions = open_store(cfg.store.db_url, cfg.store.busy_timeout_ms)
    worker = ModelWorker(
        lambda: load_for_serving(cfg, sessions), cfg.model.trim_memory_every_s, cfg.model.training_share
    ).start()
    worker.ready.wait()
    if worker.load_error is not None:
        raise SystemExit(f"the model failed to load: {worker.load_error}")
    return worker, sessions


def cmd_train_reward(cfg: AppConfig, args: argparse.Namespace) -> int:
    """Train one reward round on the votes in the database and print its metrics."""
    from rlhf_chat.learning.reward import reward_round_from_config

    worker, sessions = _start_worker(cfg)
    try:
        result = reward_round_from_config(worker, sessions, cfg)
    finally:
        worker.stop()
    if result is None:
        print(f"Not enough usable votes yet (need {cfg.reward.min_pairs} training pairs).", file=sys.stderr)
        return 1
    print(json.dumps(result.__dict__, indent=2))
    return 0


def cmd_train_policy(cfg: AppConfig, args: argparse.Namespace) -> int:
    """Run K PPO steps against the latest reward model, printing each step's metrics."""
    from rlhf_chat.learning.ppo import PPOTrainer
    from rlhf_chat.storage import store

    worker, sessions = _start_worker(cfg)
    try:
        if worker.call(0, lambda m: m.reward_version) == 0:
            print("No reward model yet: run `python -m rlhf_chat train-reward` first.", file=sys.stderr)
            return 1
        with sessions() as session:
            contexts = store.user_contexts(session)
        if not contexts:
            print("No prompts in the database yet.", file=sys.stderr)
            return 1
        trainer = PPOTrainer.from_config(worker, sessions, cfg)
        for _ in range(args.steps):
            r = trainer.step(trainer.sample_contexts(contexts))
            print(
                f"v{r.version}: reward {r.mean_reward:+.3f} KL {r.mean_kl:.3f} policy {r.policy_loss:+.4f} "
                f"value {r.value_loss:.4f} clip {r.clip_fraction:.2f} length {r.mean_length:.1f} {r.seconds:.1f} s",
                flush=True,
            )
        trainer.save(worker.serving_version)
    finally:
        worker.stop()
    return 0


# simulate()'s parameters after the config; each is the dest of the simulate flag that sets it
SIMULATE_PARAMETERS = ("labeler_spec", "comparisons", "ppo_steps", "prompts_file", "seed", "report_path", "plot_path",
                       "resume", "teacher_spec", "adversary_spec", "adversary_share", "fact_key_path",
                       "reference_answers_path")


def cmd_simulate(cfg: AppConfig, args: argparse.Namespace) -> int:
    """Run the whole loop headless with a scripted labeler; write the JSON report.

    Without ``--db`` (or ``RLHF_CHAT_DB``) it runs on a fresh database and
    checkpoint folder, named in the report.
    """
    import os

    from rlhf_chat.evaluation.simulate import UsedDatabase, fresh_store_location, simulate

    if not args.db and not os.environ.get("RLHF_CHAT_DB"):
        cfg.store.db_url, fresh_checkpoints = fresh_store_location()
        if not args.checkpoints and not os.environ.get("RLHF_CHAT_CHECKPOINTS"):
            cfg.store.checkpoint_dir = fresh_checkpoints
        print(f"fresh database: {cfg.store.db_url}", file=sys.stderr)
    if args.no_guards:
        cfg.guards.enabled = False
    if args.rounds is not None:
        if args.rounds < 1:
            print("--rounds must be at least 1", file=sys.stderr)
            return 2
        cfg.simulation.rounds = args.rounds
    for flag in ("people", "adversary_sessions", "adversary_addresses", "label_noise"):  # None: the config's default
        if getattr(args, flag) is not None:
            setattr(cfg.simulation, flag, getattr(args, flag))
    try:
        report = simulate(cfg, **{name: getattr(args, name) for name in SIMULATE_PARAMETERS})
    except (UsedDatabase, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    summary = {k: report.__dict__[k] for k in (
        "rm_heldout_accuracy", "win_rate_vs_reference", "mean_kl", "comparisons", "ppo_steps", "ppo_steps_run",
        "wall_seconds", "demonstrations", "adversary", "guards", "tripwire", "alignment_tax", "db_url",
    )}
    print(json.dumps(summary, indent=2))
    return 0


def cmd_export(cfg: AppConfig, args: argparse.Namespace) -> int:
    """Write the preferences, and the written answers beside them, as JSON Lines or
    Parquet; count what was left out on stderr."""
    from rlhf_chat.learning.export import demonstration_rows, preference_rows, write_rows
    from rlhf_chat.storage.store import open_store

    sessions = open_store(cfg.store.db_url, cfg.store.busy_timeout_ms)
    with sessions() as session:
        rows, skipped = preference_rows(session)
        written = demonstration_rows(session)
    out = Path(args.out or f"preferences.{args.format}")
    sft_out = Path(args.demonstrations_out or out.with_name(f"demonstrations.{args.format}"))
    write_rows(rows, out, args.format)
    write_rows(written, sft_out, args.format)
    print(
        f"wrote {len(rows)} preferences to {out}; left out {skipped.get('tie', 0)} ties "
        f"and {skipped.get('both_bad', 0)} both-bad votes; wrote {len(written)} written answers to {sft_out}",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m rlhf_chat`` parser."""
    parser = argparse.ArgumentParser(prog="python -m rlhf_chat", description="rlhf-chat command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-reward", help="train one reward-model round on the stored votes")
    add_common_args(p)
    p.set_defaults(run=cmd_train_reward)

    p = sub.add_parser("train-policy", help="run PPO steps against the latest reward model")
    add_common_args(p)
    p.add_argument("--steps", type=int, required=True)
    p.set_defaults(run=cmd_train_policy)

    p = sub.add_parser("simulate", help="the whole loop headless, with a scripted labeler")
    add_common_args(p)
    p.add_argument("--labeler", dest="labeler_spec", required=True,
                   help="a built-in name (concise, friendly) or package.module:function")
    p.add_argument("--comparisons", type=int, default=200)
    p.add_argument("--ppo-steps", type=int, default=60)
    p.add_argument("--prompts", dest="prompts_file", default=None,
                   help="a file of prompts, one per line (default: the shipped set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rounds", type=int, default=None,
        help="votes, a reward round and PPO take turns this many times, as in the live loop (default 4; 1: every vote first)",
    )
    p.add_argument(
        "--continue", dest="resume", action="store_true",
        help="build on a --db that already holds votes (by default such a database is refused)",
    )
    p.add_argument(
        "--teacher", dest="teacher_spec", default=None,
        help="who writes the answer they wanted for some pairs instead of voting: a built-in (follow_up) or "
        "package.module:function, (prompt, a, b) -> str | None; at most simulation.demonstrations (20)",
    )
    p.add_argument(
        "--adversary", dest="adversary_spec", default=None,
        help="a bad actor voting on a share of the pairs under its own sessions: reversed (the labeler's "
        "choice reversed), longer (always the longer answer), shorter (always the shorter), a built-in "
        "labeler, or package.module:function, a labeler",
    )
    p.add_argument("--adversary-share", type=float, default=0.3, help="its share of the votes (default 0.3)")
    p.add_argument("--people", type=int, default=None,
                   help="the honest votes come from this many people, each its own session and address "
                   "(default simulation.people, 20; 1: one voice)")
    p.add_argument("--adversary-sessions", type=int, default=None,
                   help="the adversary votes from this many sessions (default simulation.adversary_sessions, 1)")
    p.add_argument("--adversary-addresses", type=int, default=None,
                   help="... behind this many addresses, 1 up to --adversary-sessions: 1 is one person's tabs, "
                   "as many as the sessions a crowd of its own (default simulation.adversary_addresses, 1)")
    p.add_argument("--label-noise", type=float, default=None,
                   help="flip each honest decided vote with this probability, as noisy annotators "
                   "(default simulation.label_noise, 0)")
    p.add_argument("--no-guards", action="store_true",
                   help="turn the guards off (guards.enabled=false): the influence cap, the flags and the tripwire")
    p.add_argument("--fact-key", dest="fact_key_path", default=None,
                   help='JSON {"question": ["accepted answer", ...]} for the facts-kept measure (default: the shipped key)')
    p.add_argument("--reference-answers", dest="reference_answers_path", default=None,
                   help='JSON [["question", "answer"], ...] of well-formed answers for the NLL measure (default: shipped)')
    p.add_argument("--report", dest="report_path", default="simulation.json")
    p.add_argument("--plot", dest="plot_path", default=None,
                   help="PNG of the reward curve (default: beside the report)")
    p.set_defaults(run=cmd_simulate)

    p = sub.add_parser("export", help="write preferences for TRL's reward / DPO trainers")
    add_common_args(p)
    p.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    p.add_argument("--out", default=None)
    p.add_argument("--demonstrations-out", default=None,
                   help="the written answers, TRL's SFT layout (default: demonstrations.FORMAT beside --out)")
    p.set_defaults(run=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    raise SystemExit(args.run(cfg, args))
