"""Benchmark: answer quality of each way of loading the bundled model, and the answer budget.

    python bench/quality.py [--weights fp32,int4,bf16,nf4] [--int4-kernels auto] [--nll-only]
                            [--prompts 96] [--runs 6] [--unbounded 512]

For each weight path (fp32 is the shipped GGUF values de-quantized, the yardstick),
the int4 path once per kernel named in ``--int4-kernels`` (``model.int4_kernel``:
``auto,torch,avx2`` compares torch's with the native ones):

* **NLL**: mean negative log-likelihood per token of the project's own answer
  set (``bench/data/answers.jsonl``, 36 well-formed answers, EOS included),
  teacher-forced through the serving copy (eval mode) and through the training
  copy (train mode, PPO's forward: ``supervised.lm_loss``);
* **speed**: first streamed token and two full candidates of 64 tokens, as
  ``bench/generation.py`` times them;
* **answers** on the first ``--prompts`` shipped prompts (``rlhf_chat/data/prompts.txt``)
  at the app's settings: finished share, loop share (with and without the
  loop stop), and how long the answers run when nothing limits them.

Then, on the default path, the answer budget: for each budget, the share of
unbounded answers that finish within it, beside the time for two candidates
of that many tokens. Loops are counted by :func:`loops`, a detector on words
that is independent of the token rule that stops rows (``rlhf_chat/generation/repetition.py``).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import statistics
import time
from pathlib import Path

import torch
from common import PROMPTS as BENCH_PROMPTS
from common import machine, percentile, summary

from rlhf_chat.config import AppConfig
from rlhf_chat.generation.candidates import Sampling, generate_pair, sample
from rlhf_chat.learning.supervised import SupervisedExample, lm_loss
from rlhf_chat.model.loading import load_models
from rlhf_chat.runtime import warm_up
from rlhf_chat.text.behaviours import loops
from rlhf_chat.text.chat import render_prompt, render_response

ANSWERS = Path(__file__).resolve().parent / "data" / "answers.jsonl"
BUDGETS = (64, 96, 128, 160, 192, 256)


def shipped_prompts(n: int) -> list[str]:
    """The first ``n`` prompts the simulation asks (one per line)."""
    text = (importlib.resources.files("rlhf_chat") / "data" / "prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()][:n]


def answer_set() -> list[dict]:
    """The project's well-formed question/answer pairs."""
    return [json.loads(line) for line in ANSWERS.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def serving_nll(models, rows: list[dict]) -> float:
    """Mean NLL per answer token through the serving copy, one answer at a time."""
    total, count = 0.0, 0
    for row in rows:
        prompt = render_prompt(models.tokenizer, [{"role": "user", "content": row["prompt"]}])
        answer = render_response(models.tokenizer, row["answer"], True)
        ids = torch.tensor([prompt + answer], device=models.device)
        logits = models.serving(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(answer, device=models.device)[:, None])
        total -= logp.sum().item()
        count += len(answer)
    return total / count


@torch.no_grad()
def training_nll(models, rows: list[dict], batch: int = 6) -> float:
    """Mean NLL per answer token through the training copy (PPO's forward), in batches."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        examples = [SupervisedExample([{"role": "user", "content": r["prompt"]}], r["answer"]) for r in rows[start : start + batch]]
        tokens = sum(len(render_response(models.tokenizer, e.text, True)) for e in examples)
        total += lm_loss(models, examples, max_prompt_tokens=256).item() * tokens
        count += tokens
    return total / count


def pair_timings(models, cfg: AppConfig, tokens: int, runs: int) -> tuple[list[float], list[float]]:
    """First streamed token and total time of two candidates of exactly ``tokens`` tokens."""
    firsts, totals = [], []
    for run in range(runs):
        prompt = render_prompt(models.tokenizer, [{"role": "user", "content": BENCH_PROMPTS[run % 5]}])
        sampling = Sampling(tokens, cfg.sampling.temperature, cfg.sampling.top_p, run, tokens, stop_loops=False)
        first: list[float] = []
        t0 = time.perf_counter()
        generate_pair(models.serving, models.tokenizer, prompt, sampling, 0,
                      on_update=lambda texts: first.append(time.perf_counter() - t0) if not first else None)
        totals.append(time.perf_counter() - t0)
        firsts.append(first[0])
    return firsts, totals


def answers_on(models, prompts: list[str], max_new_tokens: int, temperature: float, stop_loops: bool, seed: int = 0):
    """One answer per prompt at these settings, 32 prompts per call: (texts, token counts, finished, looped)."""
    texts, counts, finished, looped = [], [], [], []
    for start in range(0, len(prompts), 32):
        rendered = [render_prompt(models.tokenizer, [{"role": "user", "content": p}]) for p in prompts[start : start + 32]]
        out = sample(models.serving, models.tokenizer, rendered,
                     Sampling(max_new_tokens, temperature, 1.0, seed + start, stop_loops=stop_loops))
        texts += out.texts
        counts += out.token_counts
        finished += out.finished
        looped += out.looped
    return texts, counts, finished, looped


def share(flags: list[bool]) -> float:
    return sum(flags) / max(1, len(flags))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="fp32,int4,bf16,nf4", help="weight paths to compare (fp32 first: the yardstick)")
    parser.add_argument("--prompts", type=int, default=96, help="shipped prompts to answer")
    parser.add_argument("--runs", type=int, default=6, help="timed pairs per measurement")
    parser.add_argument("--unbounded", type=int, default=512, help="the budget that counts as no limit")
    parser.add_argument("--int4-kernels", default="auto", help="model.int4_kernel values to run the int4 path on")
    parser.add_argument("--nll-only", action="store_true", help="only the NLL of the answer set (no timings, no answers)")
    parser.add_argument("--out", default="bench/out/quality.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = AppConfig()
    rows, prompts = answer_set(), shipped_prompts(args.prompts)
    print(f"machine: {machine()}")
    print(f"answer set: {len(rows)} answers; prompts: {len(prompts)}; app budget {cfg.sampling.max_new_tokens} tokens, "
          f"T {cfg.sampling.temperature}")
    report: dict = {"machine": machine(), "paths": {}}
    default_models = None
    paths = [(w, k) for w in args.weights.split(",") for k in (args.int4_kernels.split(",") if w == "int4" else ["auto"])]
    for weights, kernel in paths:
        cfg.model.weights, cfg.model.int4_kernel = weights, kernel
        models = load_models(cfg.model)
        if models.kernel:
            weights = "int4" if kernel == "auto" else f"int4 [{models.kernel}]"
        serving, training = serving_nll(models, rows), training_nll(models, rows)
        if args.nll_only:
            report["paths"][weights] = {"nll_serving": serving, "nll_training": training}
            print(f"[{weights}] NLL per token: serving {serving:.3f}, training {training:.3f} (int4 kernel: {models.kernel or 'none'})")
            continue
        warm_up(models)
        firsts, totals = pair_timings(models, cfg, 64, args.runs)
        budget = cfg.sampling.max_new_tokens
        on = answers_on(models, prompts, budget, cfg.sampling.temperature, True)
        off = answers_on(models, prompts, budget, cfg.sampling.temperature, False)
        path = {
            "nll_serving": serving, "nll_training": training,
            "first_token_s": statistics.median(firsts), "pair_64_s": statistics.median(totals),
            "finished_share": share(on[2]), "loop_share": share([loops(t) for t in on[0]]),
            "loop_share_without_stop": share([loops(t) for t in off[0]]), "stopped_share": share(on[3]),
        }
        report["paths"][weights] = path
        print(f"\n[{weights}] NLL per token: serving {serving:.3f}, training {training:.3f}")
        print(f"[{weights}] first token: {summary(firsts)}")
        print(f"[{weights}] two candidates of 64 tokens: {summary(totals)}")
        print(f"[{weights}] at {budget} tokens: finished {path['finished_share']:.2f}, loops {path['loop_share']:.3f} "
              f"(without the loop stop {path['loop_share_without_stop']:.3f}; rows stopped {path['stopped_share']:.3f})")
        for text, looped in list(zip(on[0], on[3]))[:3]:
            print(f"    {'[stopped] ' if looped else ''}{text[:160]!r}")
        if weights == "int4":  # the bundled model's default path on the CPU
            default_models = (weights, models)
    if "fp32" in report["paths"]:
        ref = report["paths"]["fp32"]
        for weights, path in report["paths"].items():
            print(f"{weights}: NLL above the shipped values: serving {path['nll_serving'] - ref['nll_serving']:+.3f}, "
                  f"training {path['nll_training'] - ref['nll_training']:+.3f}")

    if default_models is not None and not args.nll_only:
        weights, models = default_models
        texts, counts, finished, _ = answers_on(models, prompts, args.unbounded, cfg.sampling.temperature, True)
        lengths = [n for n, f in zip(counts, finished) if f]
        print(f"\n[{weights}] unbounded answers (limit {args.unbounded}): finished {share(finished):.2f}, "
              f"loops {share([loops(t) for t in texts]):.3f}; tokens of finished answers: median "
              f"{statistics.median(lengths) if lengths else 0:.0f}, p75 {percentile(lengths, 0.75) if lengths else 0:.0f}, "
              f"p90 {percentile(lengths, 0.9) if lengths else 0:.0f}")
        report["unbounded"] = {"counts": counts, "finished": finished}
        report["budgets"] = []
        print("budget | finished within it | two candidates (median)")
        for budget in BUDGETS:
            within = share([f and n <= budget for n, f in zip(counts, finished)])
            _, totals = pair_timings(models, cfg, budget, max(2, args.runs // 2))
            report["budgets"].append({"tokens": budget, "finished_share": within, "pair_s": statistics.median(totals)})
            print(f"{budget} | {within:.2f} | {statistics.median(totals):.2f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
