"""Reward model: what the head reads, the held-out split, training and checkpoints."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlhf_chat.config import RewardConfig
from rlhf_chat.generation.candidates import Candidate
from rlhf_chat.generation.worker import ModelWorker
from rlhf_chat.learning.checkpoints import copy_into
from rlhf_chat.learning.preferences import PreferencePair, is_heldout, preference_pairs, split_pairs, tie_pairs, to_pair
from rlhf_chat.learning.reward import (
    answer_mask,
    encode,
    evaluate,
    load_reward,
    minibatches,
    reset_reward_model,
    reward_parameters,
    reward_round_from_config,
    round_steps,
    run_round,
    score_sequences,
    score_texts,
    starts_fresh,
    train_step,
)
from rlhf_chat.model.heads import PrefixCache, answer_summary, last_token_index, position_ids_from_mask
from rlhf_chat.storage import store
from rlhf_chat.storage.tables import Comparison


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [4, 2, 4, 1]


def test_position_ids_ignore_left_padding():
    assert position_ids_from_mask(torch.tensor([[0, 0, 1, 1]])).tolist() == [[0, 0, 0, 1]]


def test_answer_summary_is_the_last_state_beside_the_answer_mean():
    hidden = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0], [5.0, 0.0]],  # left-padded, answer = last 2
                           [[1.0, 1.0], [2.0, 2.0], [7.0, 1.0], [0.0, 0.0]]])  # right-padded, answer = token 2
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    answers = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    assert answer_summary(hidden, mask, answers).tolist() == [[5.0, 0.0, 4.0, 2.0], [7.0, 1.0, 7.0, 1.0]]


def test_encode_counts_the_answer_and_keeps_it_when_cut_from_the_left(tokenizer):
    context = [{"role": "user", "content": "tell me about the weather today, in detail please"}]
    whole = encode(tokenizer, context, "It is sunny.", 512)
    answer = tokenizer.encode("It is sunny.", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert whole.ids[-whole.answer_len :] == answer
    cut = encode(tokenizer, context, "It is sunny.", len(answer) + 2)
    assert cut.ids == whole.ids[-len(answer) - 2 :] and cut.answer_len == len(answer)
    assert encode(tokenizer, context, "It is sunny.", 3) == (answer[-3:], 3)
    assert answer_mask([2, 0], 3, "cpu").tolist() == [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]


def rollout_of(models, contexts, answers: list[list[int]], texts: list[str], finished: list[bool]):
    """A PPO rollout holding exactly these answer tokens, laid out as rollout() lays them out."""
    from rlhf_chat.learning.ppo import Rollout, full_prefix
    from rlhf_chat.model.tensors import left_pad
    from rlhf_chat.text.chat import render_prompt

    tok = models.tokenizer
    prompt_ids, prompt_mask = left_pad([render_prompt(tok, c) for c in contexts], tok.pad_token_id, models.device)
    width = max(map(len, answers))
    response_ids = torch.tensor([a + [tok.pad_token_id] * (width - len(a)) for a in answers])
    response_mask = torch.tensor([[1.0] * len(a) + [0.0] * (width - len(a)) for a in answers])
    batch = Rollout(contexts, texts, finished, prompt_ids, prompt_mask, response_ids, response_mask)
    batch.prefix = full_prefix(models, prompt_ids, prompt_mask, response_ids, response_mask)
    return batch


def test_a_voted_answer_and_the_same_rollout_answer_score_alike_finished_or_cut(tiny_config, tiny_fp32_models):
    """The reward model learns from stored votes and PPO is scored on its rollouts: the
    same answer must get the same score through both paths, a finished answer (its
    EOS) and one cut off at the length limit (no EOS) alike, with the real tokenizer.
    On float32 weights: two batch layouts may round apart on a bf16 path on some CPUs
    (conftest.tiny_fp32_models)."""
    from rlhf_chat.learning.ppo import reward_model_scores
    from rlhf_chat.learning.reward import pair_scores

    tiny_models = tiny_fp32_models
    tok = tiny_models.tokenizer
    context = [{"role": "user", "content": "what is the capital of France?"}]
    done, cut = "Paris is the capital of France.", "The capital of France is Paris, a city on the"
    sessions = store.open_store(tiny_config.store.db_url)
    with sessions() as s, s.begin():
        shown = [Candidate(t, "policy", 0, 0, 0.7, 1.0, 64, 9, f, 0.1) for t, f in ((done, True), (cut, False))]
        store.record_vote(s, store.save_pair(s, session_id="t", context=context, a=shown[0], b=shown[1]).id, "a")
    with sessions() as s:
        [pair] = preference_pairs(store.voted_comparisons(s))
    assert (pair.chosen_finished, pair.rejected_finished) == (True, False)
    answers = [tok.encode(done, add_special_tokens=False) + [tok.eos_token_id], tok.encode(cut, add_special_tokens=False)]
    with torch.no_grad():
        torch.nn.init.normal_(tiny_models.reward_head.weight, std=0.1)
        try:
            from_votes = torch.cat(pair_scores(tiny_models, [pair], RewardConfig()))
            batch = rollout_of(tiny_models, [context, context], answers, [done, cut], [True, False])
            from_rollout = reward_model_scores(tiny_models, batch)
            cut_with_eos = score_texts(tiny_models, [context], [cut], 512, finished=[True])
        finally:
            torch.nn.init.zeros_(tiny_models.reward_head.weight)
    assert torch.allclose(from_rollout, from_votes, atol=1e-4), (from_rollout, from_votes)
    assert not torch.allclose(cut_with_eos, from_votes[1:], atol=1e-3)  # the cut answer was scored without EOS


def test_a_rollout_answer_that_does_not_round_trip_is_scored_in_the_stored_layout(tiny_fp32_models, monkeypatch):
    """Sampled tokens that decode and re-encode to other tokens (here a leading space,
    which the stored text loses) are scored as the stored answer would be, through a
    prefix of their own; a row beside it that round-trips keeps the rollout's prefix.
    On float32 weights: two batch layouts may round apart on a bf16 path on some CPUs
    (conftest.tiny_fp32_models)."""
    from rlhf_chat.learning import ppo

    tiny_models = tiny_fp32_models
    tok = tiny_models.tokenizer
    contexts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "what is tea?"}]]
    sampled = tok.encode(" Hello there", add_special_tokens=False) + [tok.eos_token_id]
    text = tok.decode(sampled, skip_special_tokens=True).strip()
    assert tok.encode(text, add_special_tokens=False) + [tok.eos_token_id] != sampled
    plain = "Tea is a drink."
    plain_ids = tok.encode(plain, add_special_tokens=False) + [tok.eos_token_id]
    own_prefix, real_score_sequences = [], ppo.score_sequences

    def counted(models, sequences, *args):
        own_prefix.append(len(sequences))
        return real_score_sequences(models, sequences, *args)

    monkeypatch.setattr(ppo, "score_sequences", counted)
    with torch.no_grad():
        torch.nn.init.normal_(tiny_models.reward_head.weight, std=0.1)
        try:
            batch = rollout_of(tiny_models, contexts, [sampled, plain_ids], [text, plain], [True, True])
            from_rollout = ppo.reward_model_scores(tiny_models, batch)
            stored = score_texts(tiny_models, contexts, [text, plain], 512)
        finally:
            torch.nn.init.zeros_(tiny_models.reward_head.weight)
    assert torch.allclose(from_rollout, stored, atol=1e-4)
    assert own_prefix == [1]  # only the row that does not round-trip


def test_score_is_the_same_under_any_padding(tiny_fp32_models):
    """Extra padding must change neither the last token nor the answer mean.
    On float32 weights: two batch layouts may round apart on a bf16 path on some CPUs
    (conftest.tiny_fp32_models)."""
    tiny_models = tiny_fp32_models
    tok = tiny_models.tokenizer
    with torch.no_grad():
        torch.nn.init.normal_(tiny_models.reward_head.weight, std=0.1)
        short = encode(tok, [{"role": "user", "content": "hi"}], "hello", 64)
        long = encode(tok, [{"role": "user", "content": "tell me about the weather today"}], "It is sunny.", 64)
        alone = score_sequences(tiny_models, [short])
        batched = score_sequences(tiny_models, [short, long])  # short gets left padding
        torch.nn.init.zeros_(tiny_models.reward_head.weight)
    assert torch.allclose(alone[0], batched[0], atol=1e-4)


def test_prefix_cache_scores_as_without_it_and_keeps_to_its_budget(tiny_fp32_models):
    """Cached frozen-layer states give the same scores as a fresh forward, are
    computed once per sequence, and the least recently used go beyond the budget.
    On float32 weights: two batch layouts may round apart on a bf16 path on some CPUs
    (conftest.tiny_fp32_models)."""
    tiny_models = tiny_fp32_models
    tok = tiny_models.tokenizer
    seqs = [encode(tok, [{"role": "user", "content": q}], a, 64) for q, a in
            [("hi", "hello"), ("tell me about the weather today", "It is sunny."), ("2+2?", "4")]]
    cache = PrefixCache(max_tokens=len(seqs[0].ids) + len(seqs[1].ids))
    with torch.no_grad():
        torch.nn.init.normal_(tiny_models.reward_head.weight, std=0.1)
        fresh = score_sequences(tiny_models, seqs)
        cached = score_sequences(tiny_models, seqs[:2], cache)
        kept = dict(cache.hidden)
        again = score_sequences(tiny_models, seqs[:2], cache)  # from the cache alone
        assert all(cache.hidden[k] is v for k, v in kept.items())
        score_sequences(tiny_models, seqs[2:], cache)  # over budget: the oldest goes
        torch.nn.init.zeros_(tiny_models.reward_head.weight)
    assert torch.allclose(cached, fresh[:2], atol=1e-5) and torch.equal(cached, again)
    assert tuple(seqs[0].ids) not in cache.hidden and tuple(seqs[2].ids) in cache.hidden
    assert cache.tokens == sum(len(k) for k in cache.hidden) <= cache.max_tokens


def test_heldout_split_is_stable_and_about_ten_percent():
    ids = range(1, 5001)
    first = [i for i in ids if is_heldout(i, 0.1)]
    assert first == [i for i in ids if is_heldout(i, 0.1)]
    assert 400 < len(first) < 600
    pairs = [PreferencePair(i, [], "a", "b") for i in range(1, 301)]
    train, held = split_pairs(pairs, 0.1)
    assert {p.comparison_id for p in held} == {i for i in range(1, 301) if is_heldout(i, 0.1)}
    assert len(train) + len(held) == 300


def test_ties_and_both_bad_give_no_pair():
    def comp(choice):
        return Comparison(id=1, context=[], response_a="A", response_b="B", choice=choice)

    assert to_pair(comp("a")).chosen == "A" and to_pair(comp("b")).chosen == "B"
    assert to_pair(comp("tie")) is None and to_pair(comp("both_bad")) is None and to_pair(comp(None)) is None


def test_round_steps_bounded():
    cfg = RewardConfig(batch_size=8, steps_per_round=60, max_epochs_per_round=2.0)
    assert round_steps(16, cfg) == 4 and round_steps(1000, cfg) == 60


def test_a_round_starts_fresh_while_a_full_fit_fits_in_it():
    cfg = RewardConfig(batch_size=8, steps_per_round=60, max_epochs_per_round=3.0)
    # 3 epochs over 160 votes are 60 steps of 8: fresh; over 161, 61 steps: continue
    assert starts_fresh(160, cfg) and not starts_fresh(161, cfg)
    cfg.fresh_each_round = False
    assert not starts_fresh(10, cfg)


def test_reset_gives_a_new_reward_model_that_says_nothing(tiny_path):
    from rlhf_chat.config import ModelConfig
    from rlhf_chat.model.loading import POLICY, REWARD, adapter_state, load_models

    models = load_models(ModelConfig(name=str(tiny_path)))
    policy_before = {k: v.clone() for k, v in adapter_state(models.trainer, POLICY).items()}
    contexts, answers = [[{"role": "user", "content": "hi"}]] * 2, ["Hello there.", "Hi"]
    with torch.no_grad():
        for p in [*adapter_state(models.trainer, REWARD).values(), *models.reward_head.parameters()]:
            p.normal_()
    assert score_texts(models, contexts, answers, 64).abs().min() > 0
    reset_reward_model(models, seed=3)
    first = {k: v.clone() for k, v in adapter_state(models.trainer, REWARD).items()}
    reset_reward_model(models, seed=3)
    assert all(torch.equal(first[k], v) for k, v in adapter_state(models.trainer, REWARD).items())
    assert all(v.abs().sum() > 0 for k, v in first.items() if "lora_A" in k)
    assert torch.equal(score_texts(models, contexts, answers, 64), torch.zeros(2))  # B and head at zero
    assert all(torch.equal(policy_before[k], v) for k, v in adapter_state(models.trainer, POLICY).items())


def test_minibatches_cover_every_pair_each_epoch():
    pairs = [PreferencePair(i, [], "a", "b") for i in range(10)]
    batches = minibatches(pairs, 5, 2, seed=0)
    assert sorted(p.comparison_id for b in batches for p in b) == list(range(10))
    longer = minibatches(pairs, 4, 4, seed=0)  # 16 draws: a whole epoch, then the next one's start
    assert [len(b) for b in longer] == [4, 4, 4, 4]
    first_epoch = [p.comparison_id for b in longer for p in b][:10]
    assert sorted(first_epoch) == list(range(10))
    assert longer == minibatches(pairs, 4, 4, seed=0) and longer != minibatches(pairs, 4, 4, seed=1)  # seeded


def length_pairs(n: int) -> list[PreferencePair]:
    """Shorter answer preferred: a rule a tiny model learns in a few steps."""
    return [
        PreferencePair(i, [{"role": "user", "content": f"question {i}"}], "Yes.", "Well, " + "it depends " * (2 + i % 5))
        for i in range(n)
    ]


def test_training_steps_raise_heldout_accuracy_and_change_only_reward_weights(tiny_path):
    from rlhf_chat.config import ModelConfig
    from rlhf_chat.model.loading import POLICY, REWARD, adapter_state, load_models

    models = load_models(ModelConfig(name=str(tiny_path)))
    cfg = RewardConfig(batch_size=8, learning_rate=5e-3)
    pairs = length_pairs(16)
    heldout = length_pairs(24)[16:]  # other questions, not seen in training
    policy_before = {k: v.clone() for k, v in adapter_state(models.trainer, POLICY).items()}
    before = evaluate(models, heldout, cfg)
    opt = torch.optim.AdamW(reward_parameters(models), lr=cfg.learning_rate)
    for batch in minibatches(pairs, 8, 20, seed=0):
        stats = train_step(models, opt, batch, cfg)
        assert not stats["skipped"]
    after = evaluate(models, heldout, cfg)
    assert after["loss"] < before["loss"] and after["accuracy"] == 1.0
    assert any(v.abs().sum() > 0 for k, v in adapter_state(models.trainer, REWARD).items() if "lora_B" in k)
    assert all(torch.equal(policy_before[k], v) for k, v in adapter_state(models.trainer, POLICY).items())


def store_length_votes(db_url: str, n: int):
    """A store holding n votes for the shorter answer, as the UI stores them."""
    sessions = store.open_store(db_url)
    for p in length_pairs(n):
        cand = lambda t: Candidate(t, "policy", 0, 0, 1.0, 1.0, 8, 1, True, 0.1)  # noqa: E731
        with sessions() as s, s.begin():
            c = store.save_pair(s, session_id="t", context=p.context, a=cand(p.chosen), b=cand(p.rejected))
            store.record_vote(s, c.id, "a", "clearly" if p.comparison_id % 2 else None)
    return sessions


def test_tie_pairs_ask_for_equal_scores_and_weigh_what_they_are_given():
    def comp(i, choice):
        return Comparison(id=i, context=[], response_a=f"A{i}", response_b=f"B{i}", choice=choice)

    votes = [comp(1, "a"), comp(2, "tie"), comp(3, "both_bad"), comp(4, "tie"), comp(5, "b")]
    ties = tie_pairs(votes, 0.5)
    assert [(p.comparison_id, p.chosen, p.rejected) for p in ties] == [(2, "A2", "B2"), (4, "A4", "B4")]
    assert all(p.target == 0.5 and p.weight == 0.5 and p.source == "tie" for p in ties)
    assert tie_pairs(votes, 0.0) == []  # off: ties say nothing, as before
    assert all(p.target == 1.0 for p in preference_pairs(votes))


MARKED = "Sure, glad to help: "
FILLER = "it depends "


def store_confounded_votes(db_url: str, ties: bool):
    """Votes where the winner has a marker and is also longer (the confound a
    marker-counting person's votes carry), and, with ``ties``, tied pairs of a
    long and a short answer without the marker."""
    sessions = store.open_store(db_url)
    cand = lambda t: Candidate(t, "policy", 0, 0, 1.0, 1.0, 8, 1, True, 0.1)  # noqa: E731
    for i in range(24):
        context = [{"role": "user", "content": f"question {i}"}]
        with sessions() as s, s.begin():
            c = store.save_pair(s, session_id="t", context=context, a=cand(MARKED + FILLER * (4 + i % 3)),
                                b=cand(FILLER * (1 + i % 2)))
            store.record_vote(s, c.id, "a")
            if ties:
                t = store.save_pair(s, session_id="t", context=context, a=cand(FILLER * (4 + i % 3)),
                                    b=cand(FILLER * (1 + i % 2)))
                store.record_vote(s, t.id, "tie")
    return sessions


def test_ties_count_toward_the_next_round_only_when_they_train(tmp_path):
    from rlhf_chat.learning.reward import usable_feedback

    sessions = store_confounded_votes(f"sqlite:///{tmp_path / 'count.db'}", ties=True)  # 24 votes, 24 ties
    with sessions() as s:
        assert usable_feedback(s, tie_weight=0.0) == 24
        assert usable_feedback(s, tie_weight=1.0) == 48


def test_ties_teach_the_reward_model_that_length_is_not_the_taste(tiny_config, tmp_path):
    """Fitted to confounded votes, a reward model learns length (4.05 apart for 6 against
    1 filler, measured); with the ties beside them in the loss it scores length far
    less (0.61) and a marked answer above an unmarked one of as many tokens (-2.66 ->
    +0.17). With tie_pairs stubbed both runs are the same and this fails."""
    from rlhf_chat.model.loading import load_models

    cfg = tiny_config.reward
    cfg.learning_rate, cfg.steps_per_round, cfg.max_epochs_per_round = 5e-3, 24, 4.0
    contexts = [[{"role": "user", "content": f"new question {i}"}] for i in range(4)]
    long, short = FILLER * 6, FILLER * 1
    marked, unmarked = MARKED + FILLER * 2, FILLER * 5  # about as many tokens
    effects = {}
    worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
    try:
        for tie_weight in (0.0, 1.0):
            cfg.tie_weight = tie_weight
            sessions = store_confounded_votes(f"sqlite:///{tmp_path / f'ties-{tie_weight}.db'}", ties=True)
            tiny_config.store.checkpoint_dir = str(tmp_path / f"ckpt-{tie_weight}")
            result = reward_round_from_config(worker, sessions, tiny_config)
            assert result.heldout_pairs == sum(is_heldout(i, 0.1) for i in range(1, 49, 2))  # votes only
            texts = [long, short, marked, unmarked]
            scores = worker.call(0, lambda m: torch.stack([
                score_texts(m, contexts, [t] * len(contexts), cfg.max_length) for t in texts
            ]).mean(-1))
            effects[tie_weight] = {"length": (scores[0] - scores[1]).item(), "marker": (scores[2] - scores[3]).item()}
    finally:
        worker.stop()
    without, with_ties = effects[0.0], effects[1.0]
    assert without["length"] > 0.5, effects  # the confound is learned as length
    assert abs(with_ties["length"]) < 0.3 * without["length"], effects  # ties drop most of it ...
    assert with_ties["marker"] > without["marker"] + 1.0, effects  # ... and the marker is no longer outscored by length


def test_a_fresh_round_carries_nothing_of_the_last_adapter(tiny_config):
    """A poisoned adapter (NaN) poisons a continuing round, never a fresh one."""
    from rlhf_chat.model.loading import REWARD, adapter_state, load_models

    sessions = store_length_votes(tiny_config.store.db_url, 20)
    cfg = tiny_config.reward
    cfg.steps_per_round = 10  # 3 epochs over 18 training votes: 7 steps, so fresh
    worker = ModelWorker(lambda: load_models(tiny_config.model)).start()

    def poison(models) -> None:
        with torch.no_grad():
            for name, p in adapter_state(models.trainer, REWARD).items():
                p.fill_(float("nan"))

    try:
        worker.call(0, poison)
        assert math.isfinite(reward_round_from_config(worker, sessions, tiny_config).loss)
        worker.call(0, poison)
        cfg.fresh_each_round = False
        with pytest.raises(FloatingPointError, match="not finite"):
            reward_round_from_config(worker, sessions, tiny_config)
    finally:
        worker.stop()
    with sessions() as s:  # the poisoned round left no trace
        assert [r.version for r in store.reward_rounds(s)] == [1]
        assert store.latest_checkpoint(s, "reward").version == 1


def test_round_on_votes_saves_a_checkpoint_that_reloads_to_the_same_scores(tiny_config):
    from rlhf_chat.model.loading import load_models

    sessions = store_length_votes(tiny_config.store.db_url, 40)
    cfg = tiny_config.reward
    cfg.learning_rate, cfg.steps_per_round = 5e-3, 12
    worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
    try:
        result = reward_round_from_config(worker, sessions, tiny_config)
        assert result.version == 1 and result.train_pairs + result.heldout_pairs == 40
        assert result.heldout_pairs > 0 and result.heldout_accuracy is not None
        contexts = [p.context for p in length_pairs(6)]
        answers = ["Yes.", "No, not at all, never", "Hmm", "it depends it depends", "OK", "Sure thing, yes"]
        scores = worker.call(0, lambda m: score_texts(m, contexts, answers, cfg.max_length))
        second = reward_round_from_config(worker, sessions, tiny_config)
        assert second.version == 2
    finally:
        worker.stop()
    with sessions() as s:
        rounds = store.reward_rounds(s)
        assert [r.version for r in rounds] == [1, 2] and rounds[0].train_pairs == result.train_pairs
        assert store.latest_checkpoint(s, "reward").version == 2
    fresh = load_models(tiny_config.model)
    assert load_reward(fresh, result.checkpoint) == 1
    old_head = torch.nn.Linear(fresh.hidden_size, 1)  # saved before the head read the answer mean
    with pytest.raises(ValueError, match="head.weight has shape"):
        copy_into({"head.weight": fresh.reward_head.weight}, {"head.weight": old_head.weight.detach()})
    reloaded = score_texts(fresh, contexts, answers, cfg.max_length)
    # the trained model says something (a head at zero would pass the reload trivially) ...
    assert scores.std() > 1e-3 and scores[0] > scores[3]  # "Yes." over "it depends it depends"
    assert torch.allclose(scores, reloaded, atol=1e-5)  # ... and says the same after the reload
    fresh.base = {**fresh.base, "model": "another/model"}  # a process serving another base
    with pytest.raises(ValueError, match="trained on model .*; this process runs model 'another/model'"):
        load_reward(fresh, result.checkpoint)


def test_too_few_votes_gives_no_round(tiny_config):
    sessions = store.open_store(tiny_config.store.db_url)
    assert reward_round_from_config(None, sessions, tiny_config) is None


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped(tiny_path):
    """An inf gradient (here from a hook on the head) with a finite loss: no step, and
    Adam's state is not poisoned either."""
    from rlhf_chat.config import ModelConfig
    from rlhf_chat.model.loading import load_models

    models = load_models(ModelConfig(name=str(tiny_path)))
    cfg = RewardConfig(batch_size=4, learning_rate=5e-3)
    opt = torch.optim.AdamW(reward_parameters(models), lr=cfg.learning_rate)
    pairs = length_pairs(4)
    assert not train_step(models, opt, pairs, cfg)["skipped"]  # a real step first: Adam has state
    before = {id(p): p.detach().clone() for p in reward_parameters(models)}
    state_before = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()}
    hook = models.reward_head.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    try:
        stats = train_step(models, opt, pairs, cfg)
    finally:
        hook.remove()
    assert math.isfinite(stats["loss"]) and stats["skipped"]
    assert all(torch.equal(before[id(p)], p) for p in reward_parameters(models))
    after = opt.state_dict()["state"]
    assert all(torch.equal(state_before[k][n], after[k][n]) for k in state_before for n in state_before[k])


def test_score_texts_gives_one_score_per_answer_in_order_across_chunks(tiny_path):
    """Scored in chunks of ``batch_size``, every answer keeps its own score: the first
    chunk included, the order kept, each as when scored alone.
    On float32 weights: two batch layouts may round apart on a bf16 path on some CPUs
    (conftest.tiny_fp32_models)."""
    from rlhf_chat.config import ModelConfig
    from rlhf_chat.learning.reward import score_texts
    from rlhf_chat.model.loading import load_models

    tiny_models = load_models(ModelConfig(name=str(tiny_path), weights="fp32"))
    with torch.no_grad():  # a head that says something (a fresh one scores every answer 0)
        tiny_models.reward_head.weight.copy_(torch.randn(tiny_models.reward_head.weight.shape,
                                                         generator=torch.Generator().manual_seed(0)))
    contexts = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]
    answers = [f"answer number {i} " * (i + 1) for i in range(5)]
    together = score_texts(tiny_models, contexts, answers, 512, batch_size=2)
    alone = torch.cat([score_texts(tiny_models, [c], [a], 512) for c, a in zip(contexts, answers)])
    assert together.shape == (5,) and together.abs().min() > 0
    assert torch.allclose(together, alone, atol=1e-4)
    assert len(set(together.tolist())) == 5  # five answers, five scores: none shifted onto another
    assert score_texts(tiny_models, [], [], 512).shape == (0,)  # nothing to score: no score


def test_a_reward_step_clips_the_gradient_to_norm_one_and_skips_a_non_finite_loss(tiny_path):
    """With plain SGD at rate 1 the step is the clipped gradient itself: its norm is 1
    when the raw gradient is larger. A non-finite loss is skipped and says so."""
    from rlhf_chat.config import ModelConfig
    from rlhf_chat.model.loading import load_models

    models = load_models(ModelConfig(name=str(tiny_path)))
    with torch.no_grad():  # a loud head: the raw gradient is far above norm 1
        models.reward_head.weight.copy_(50 * torch.randn(models.reward_head.weight.shape,
                                                         generator=torch.Generator().manual_seed(1)))
    cfg = RewardConfig(batch_size=4)
    params = reward_parameters(models)
    before = [p.detach().clone() for p in params]
    assert not train_step(models, torch.optim.SGD(params, lr=1.0), length_pairs(4), cfg)["skipped"]
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before)))
    assert step.item() == pytest.approx(1.0, rel=1e-3)

    with torch.no_grad():  # a head that answers NaN: the loss itself is not finite
        models.reward_head.bias.fill_(float("nan"))
    assert train_step(models, torch.optim.SGD(params, lr=1.0), length_pairs(4), cfg)["skipped"]


def test_evaluate_on_no_pairs_says_nothing_was_measured(tiny_models):
    from rlhf_chat.learning.reward import evaluate

    out = evaluate(tiny_models, [], RewardConfig())
    assert math.isnan(out["loss"]) and (out["accuracy"], out["mean_margin"], out["scores"]) == (None, 0.0, [])


@pytest.mark.parametrize("top_layers", [9, 8])  # one frozen layer below the adapted ones, and two
def test_the_frozen_prefix_then_the_top_layers_equal_one_whole_forward(tiny_path, top_layers):
    from rlhf_chat.config import ModelConfig
    from rlhf_chat.model.heads import first_adapted_layer, frozen_prefix, hidden_states, top_hidden
    from rlhf_chat.model.loading import load_models
    from rlhf_chat.model.tensors import left_pad

    models = load_models(ModelConfig(name=str(tiny_path), lora_top_layers=top_layers))
    assert first_adapted_layer(models.trainer) == 10 - top_layers
    ids, mask = left_pad([[5, 6, 7, 8, 9], [11, 12]], models.tokenizer.pad_token_id, models.device)
    with torch.no_grad():
        split = top_hidden(models.trainer, frozen_prefix(models.trainer, ids, mask))
        whole = hidden_states(models.trainer, ids, mask)
    real = mask.bool()
    assert torch.allclose(split[real], whole[real], atol=1e-4)


def record_assessments(monkeypatch) -> list[tuple]:
    """Every call of the guards' assessment a round makes, as (guards.enabled,
    guards.max_share, demonstration weight, tie weight)."""
    from rlhf_chat.learning import guards

    calls, real = [], guards.assess_feedback

    def recording(session, cfg, demonstration_weight=1.0, tie_weight=0.0):
        calls.append((cfg.enabled, cfg.max_share, demonstration_weight, tie_weight))
        return real(session, cfg, demonstration_weight, tie_weight)

    monkeypatch.setattr(guards, "assess_feedback", recording)
    return calls


def test_a_round_from_the_config_weighs_its_pairs_with_the_configs_settings(tmp_path, monkeypatch):
    """reward_round_from_config passes the guards, loop.demonstration_weight and
    reward.tie_weight through; run_round left without them takes the config's defaults
    (no default of its own). Model-free: too few votes, so no round trains."""
    from rlhf_chat.config import AppConfig, apply_overrides

    sessions = store.open_store(f"sqlite:///{tmp_path / 'empty.db'}")
    calls = record_assessments(monkeypatch)
    cfg = apply_overrides(AppConfig(), ["guards.enabled=false", "guards.max_share=0.5", "loop.demonstration_weight=2",
                                        "reward.tie_weight=0.25", f"store.checkpoint_dir={tmp_path / 'ckpt'}"])
    assert reward_round_from_config(None, sessions, cfg) is None
    assert run_round(None, sessions, RewardConfig(), str(tmp_path / "ckpt")) is None
    defaults = AppConfig()
    assert calls == [(False, 0.5, 2.0, 0.25), (defaults.guards.enabled, defaults.guards.max_share,
                                               defaults.loop.demonstration_weight, defaults.reward.tie_weight)]


def test_a_rounds_stored_row_is_its_results_columns_with_nan_as_zero():
    from rlhf_chat.learning.reward import RoundResult

    result = RoundResult(version=3, loss=0.5, heldout_accuracy=None, mean_margin=float("nan"), train_pairs=9,
                         heldout_pairs=1, votes=10, seconds=2.0, checkpoint="c/3", train_accuracy=0.9)
    assert result.row() == {"version": 3, "loss": 0.5, "heldout_accuracy": None, "mean_margin": 0.0,
                            "train_pairs": 9, "heldout_pairs": 1, "votes": 10, "seconds": 2.0}


def test_scoring_many_votes_gives_way_to_a_person_after_each_batch(tiny_models, monkeypatch):
    """``evaluate`` and ``agreement_of`` run in one worker job over up to hundreds of
    votes; each batch ends at a yield point, so a person waits one batch, not the job
    (a soak with training on saw p95 80 s without them)."""
    import rlhf_chat.generation.worker as w
    import rlhf_chat.learning.reward as reward

    calls = []  # this thread plays the worker's: yield_point asks it to run urgent jobs
    monkeypatch.setattr(w._current, "worker", SimpleNamespace(run_urgent=lambda: calls.append(1)), raising=False)
    cfg = RewardConfig(batch_size=4)
    pairs = length_pairs(10)  # three batches
    reward.evaluate(tiny_models, pairs, cfg)
    assert len(calls) == 3
    reward.agreement_of(tiny_models, pairs, cfg)
    assert len(calls) == 6


def test_a_batch_too_long_for_one_pass_gets_the_same_step_a_chunk_at_a_time(tiny_path):
    """reward.max_batch_tokens: the batch is scored once, and the loss's gradient goes
    back through the scorer a chunk of sequences at a time. The step equals the
    one-pass step (the chain rule through the scores), with no chunk left out."""
    from rlhf_chat.config import ModelConfig
    from rlhf_chat.learning.reward import reward_parameters, token_chunks, train_step
    from rlhf_chat.model.loading import load_models

    pairs = length_pairs(6)
    deltas = []
    for budget in (0, 40):  # one pass; chunks of at most 40 padded tokens (several)
        models = load_models(ModelConfig(name=tiny_path))
        params = reward_parameters(models)
        with torch.no_grad():  # a reward model that is not flat, so every chunk's scores matter
            models.reward_head.weight.copy_(torch.randn(models.reward_head.weight.shape,
                                                        generator=torch.Generator().manual_seed(0)))
        before = [p.detach().clone() for p in params]
        cfg = RewardConfig(max_batch_tokens=budget)
        lengths = [len(s) for s in _sequence_ids(models, pairs, cfg)]
        assert (len(token_chunks(lengths, budget)) > 2) == (budget > 0)
        stats = train_step(models, torch.optim.SGD(params, lr=1.0), pairs, cfg)
        assert not stats["skipped"]
        deltas.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)]))
    assert deltas[0].abs().max() > 1e-4
    # equal up to rounding: the chunks are padded to other widths than the one batch
    gap = ((deltas[1] - deltas[0]).norm() / deltas[0].norm()).item()
    assert gap < 1e-3, gap


def _sequence_ids(models, pairs, cfg):
    from rlhf_chat.learning.reward import pair_sequences

    return [s.ids for s in pair_sequences(models.tokenizer, pairs, cfg)]
