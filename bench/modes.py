"""Modes: how often the bundled model follows each response mode's openings.

For every opening of every built-in mode (and the plain answer as the
baseline), one answer per held-out simulation prompt at the app's sampling
settings; printed per opening: the share of answers showing the mode's
behaviour (``behaviours.DETECTORS``), the same share for the part the model
wrote itself (the opening left out, so an opening that names its behaviour
cannot count for itself), the finished share and a quoted answer.

    python bench/modes.py [--prompts 48] [--out bench/out/modes.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import machine

from rlhf_chat.config import AppConfig
from rlhf_chat.evaluation.simulate import as_context, load_prompts, split_prompts
from rlhf_chat.generation.candidates import Sampling, sample
from rlhf_chat.generation.modes import BUILTIN_MODES
from rlhf_chat.model.loading import load_models
from rlhf_chat.runtime import warm_up
from rlhf_chat.text.behaviours import DETECTORS
from rlhf_chat.text.chat import render_prompt


def answers(models, prompts: list[str], opening: str, cfg: AppConfig, seed: int) -> tuple[list[str], list[bool]]:
    """One answer per prompt, each starting with ``opening``: (texts, finished)."""
    texts, finished = [], []
    for start in range(0, len(prompts), 24):
        chunk = prompts[start : start + 24]
        rendered = [render_prompt(models.tokenizer, as_context(p)) for p in chunk]
        out = sample(models.serving, models.tokenizer, rendered, Sampling.from_config(cfg.sampling, seed + start),
                     openings=[opening] * len(chunk))
        texts += out.texts
        finished += out.finished
    return texts, finished


def share(flags) -> float:
    flags = list(flags)
    return sum(bool(f) for f in flags) / max(1, len(flags))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48, help="held-out simulation prompts to answer")
    parser.add_argument("--out", default="bench/out/modes.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = AppConfig()
    prompts = split_prompts(load_prompts())[1][: args.prompts]
    models = load_models(cfg.model)
    warm_up(models)
    print(f"machine: {machine()}\nprompts: {len(prompts)} held-out; budget {cfg.sampling.max_new_tokens} tokens, "
          f"T {cfg.sampling.temperature}")
    start = time.perf_counter()
    plain, plain_finished = answers(models, prompts, "", cfg, 0)
    report: dict = {"machine": machine(), "prompts": len(prompts), "plain": {}, "modes": {}}
    report["plain"] = {name: share(map(detect, plain)) for name, detect in DETECTORS.items()}
    report["plain"]["finished"] = share(plain_finished)
    print("plain answers: " + ", ".join(f"{k} {v:.2f}" for k, v in report["plain"].items()))
    print("\n| mode | opening | behaviour | plain | with opening | written part only | finished |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode in BUILTIN_MODES:
        if not mode.openings:
            continue
        detect = DETECTORS[mode.behaviour]
        rows = []
        for opening in mode.openings:
            texts, finished = answers(models, prompts, opening, cfg, 0)
            written = [t[len(opening.strip()):] if t.startswith(opening.strip()) else t for t in texts]
            row = {"opening": opening, "take_rate": share(map(detect, texts)),
                   "written_part": share(map(detect, written)), "finished": share(finished), "quote": texts[0]}
            rows.append(row)
            print(f"| {mode.name} | {opening!r} | {mode.behaviour} | {report['plain'][mode.behaviour]:.2f} | "
                  f"{row['take_rate']:.2f} | {row['written_part']:.2f} | {row['finished']:.2f} |")
        report["modes"][mode.name] = {"behaviour": mode.behaviour, "openings": rows,
                                      "take_rate": sum(r["take_rate"] for r in rows) / len(rows)}
    print("\nquoted answers (first prompt):")
    for name, entry in report["modes"].items():
        for row in entry["openings"]:
            print(f"  [{name}] {row['quote'][:200]!r}")
    print(f"\n{time.perf_counter() - start:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
