"""Would the tests notice? Replace a piece of the loop by a stub and run the test that
guards it: each must FAIL. (Issue "Tests that catch a broken loop"; README, "Tests".)

    python scripts/stub_check.py            # every stub, one pytest run each (a few minutes)
    python scripts/stub_check.py reference  # the stubs whose name contains "reference"

A stub is applied by monkeypatching in the pytest process (a plugin), so the
source is never edited. The script exits 1 when a test still passes with its stub.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (the test that must fail, Python code that applies the stub at import time)
STUBS: dict[str, tuple[str, str]] = {
    "score_rollout adds no score and no penalty": (
        "tests/test_ppo.py::test_score_rollout_masks_after_eos_and_places_score_minus_kl_at_the_end",
        "import rlhf_chat.learning.ppo_math as pm, torch\n"
        "pm.penalized_rewards = lambda s, lp, rlp, m, c, e='k1': (torch.zeros_like(lp), torch.zeros_like(lp))\n",
    ),
    "the reference pass leaves the adapter on": (
        "tests/test_ppo.py::test_reference_pass_runs_without_the_adapter",
        "import contextlib\nfrom peft import PeftModel\nPeftModel.disable_adapter = lambda self: contextlib.nullcontext()\n",
    ),
    "the reference pass leaves the adapter on (KL is never 0 after an update)": (
        "tests/test_ppo.py::test_score_rollout_masks_after_eos_and_places_score_minus_kl_at_the_end",
        "import contextlib\nfrom peft import PeftModel\nPeftModel.disable_adapter = lambda self: contextlib.nullcontext()\n",
    ),
    "restore() after a bad step does nothing": (
        "tests/test_ppo.py::test_non_finite_step_after_a_real_update_restores_adapter_and_optimizer",
        "import rlhf_chat.learning.ppo as ppo\nppo.restore = lambda models, optimizer, saved: None\n",
    ),
    "the store never says 'already has your vote' (UI phase check only)": (
        "tests/test_ui.py::test_double_vote_and_stale_vote_refused",
        "import rlhf_chat.storage.store as st\n_real = st.record_vote\n"
        "def record_vote(session, cid, choice, strength=None, session_id=None):\n"
        "    from rlhf_chat.storage.tables import Comparison\n"
        "    row = session.get(Comparison, cid)\n"
        "    if row is not None and row.choice is not None:\n"
        "        row.choice = None\n"
        "    return _real(session, cid, choice, strength, session_id)\n"
        "st.record_vote = record_vote\n",
    ),
    "a reward round that trains nothing": (
        "tests/test_reward.py::test_round_on_votes_saves_a_checkpoint_that_reloads_to_the_same_scores",
        "import rlhf_chat.learning.reward as r\nr.train_step = lambda *a, **k: {'loss': 0.69, 'skipped': False}\n",
    ),
    "load_policy without the weight copy": (
        "tests/test_ppo.py::test_policy_checkpoint_reloads_into_both_copies",
        "import rlhf_chat.learning.ppo as ppo\nfrom rlhf_chat.learning.checkpoints import load_checkpoint\n"
        "def load_policy(models, path, sha256=None):\n"
        "    _, meta = load_checkpoint(path)\n"
        "    models.serving_version = int(meta['version'])\n"
        "    return models.serving_version\n"
        "ppo.load_policy = load_policy\n",
    ),
    "the reward LoRA never trains (the head alone)": (
        "tests/test_reward.py::test_training_steps_raise_heldout_accuracy_and_change_only_reward_weights",
        "import rlhf_chat.learning.reward as r\nr.reward_parameters = lambda models: list(models.reward_head.parameters())\n",
    ),
    "the reward step ignores a non-finite gradient": (
        "tests/test_reward.py::test_a_finite_loss_with_a_non_finite_gradient_is_skipped",
        "import torch\n_clip = torch.nn.utils.clip_grad_norm_\n"
        "torch.nn.utils.clip_grad_norm_ = lambda params, max_norm: _clip(params, max_norm).nan_to_num(posinf=0.0)\n",
    ),
    "a stored cut-off answer is re-encoded with an EOS": (
        "tests/test_reward.py::test_a_voted_answer_and_the_same_rollout_answer_score_alike_finished_or_cut",
        "import rlhf_chat.learning.reward as r\n_enc = r.encode\n"
        "r.encode = lambda tok, c, resp, n, finished=True: _enc(tok, c, resp, n, True)\n",
    ),
    "PPO-ptx does nothing": (
        "tests/test_ppo.py::test_ptx_term_learns_the_chosen_answers_and_changes_the_update",
        "import rlhf_chat.learning.ppo as ppo, torch\nppo.lm_loss = lambda models, examples, n: torch.zeros((), requires_grad=True)\n",
    ),
    "votes between modes teach the plain policy nothing (no winners reach the LM term)": (
        "tests/test_ppo.py::test_votes_between_modes_teach_the_plain_policy_the_chosen_behaviour",
        "import rlhf_chat.learning.ppo as ppo\nppo.PPOTrainer.supervised_examples = lambda self: []\n",
    ),
    "PPO's guided rows get no opening (every rollout row plain)": (
        "tests/test_ppo.py::test_guided_rollouts_teach_the_plain_policy_an_opening_it_never_samples",
        "import rlhf_chat.learning.ppo as ppo\n"
        "ppo.guided_openings = lambda modes, fraction, rng, records: [''] * len(records)\n",
    ),
    "PPO's guided rows read the votes on every kind of question alike": (
        "tests/test_modes.py::test_the_trainer_opens_guided_rows_as_people_chose_on_that_kind_of_question",
        "import rlhf_chat.learning.ppo as ppo\n"
        "_read = ppo.mode_record_for\n"
        "ppo.mode_record_for = lambda session, choice, prompt=None: _read(session, 'thompson', prompt)\n",
    ),
    "a guided row's opening stays in the prompt (PPO never scores it)": (
        "tests/test_ppo.py::test_a_guided_row_opens_its_answer_with_the_opening_scored_as_the_policys_own",
        "import rlhf_chat.learning.ppo as ppo\n"
        "ppo.move_openings_into_answers = lambda *a, **k: None\n",
    ),
    "a mode pair is sampled without its openings": (
        "tests/test_modes.py::test_a_mode_pair_records_its_modes_and_an_arena_pair_refuses_them",
        "import rlhf_chat.generation.candidates as c\n_sample = c.sample\n"
        "c.sample = lambda *a, openings=None, **k: _sample(*a, **k)\n",
    ),
    "a strict labeler breaks ties by length": (
        "tests/test_modes.py::test_strict_labelers_say_tie_unless_only_one_answer_shows_the_behaviour",
        "import rlhf_chat.evaluation.labelers as l\n_strict = l.strict_choice\n"
        "l.strict_choice = lambda a, b: _strict(a, b) if a != b else 'a'\n",
    ),
    "a PPO step that updates nothing": (
        "tests/test_learning.py::test_votes_train_a_reward_model_that_teaches_ppo_the_labelers_taste",
        "import rlhf_chat.learning.ppo as ppo\nppo.PPOTrainer._update = lambda self, batch, n, examples: ([{'finite': True}], True)\n",
    ),
    "PPO runs on without a budget": (
        "tests/test_training_loop.py::test_ppo_stops_when_its_budget_for_a_reward_version_is_spent",
        "import rlhf_chat.learning.training_loop as tl\ntl.TrainingLoop.ppo_budget_spent = lambda self, version: ''\n",
    ),
    "serving shares the training copy's adapter (half-updated policies served)": (
        "tests/test_live.py::test_people_are_only_ever_served_a_completed_policy_version",
        "import rlhf_chat.learning.ppo as ppo\nfrom rlhf_chat.model.loading import sync_policy_weights\n_mb = ppo.minibatch_update\n"
        "def minibatch_update(models, *a, **k):\n"
        "    out = _mb(models, *a, **k)\n"
        "    sync_policy_weights(models.trainer, models.serving)  # leak every minibatch into serving\n"
        "    return out\n"
        "ppo.minibatch_update = minibatch_update\n",
    ),
    "concurrent clicks: the atomic UPDATE is a read-then-write": (
        "tests/test_store.py::test_concurrent_double_click_stores_one_vote",
        "import rlhf_chat.storage.store as st, time\nfrom rlhf_chat.storage.tables import Comparison\nfrom rlhf_chat.storage.store import VoteResult\n"
        "def record_vote(session, cid, choice, strength=None, session_id=None):\n"
        "    row = session.get(Comparison, cid)\n"
        "    if row.choice is not None:\n"
        "        return VoteResult(False, 'This pair already has your vote.')\n"
        "    time.sleep(0.05)\n"
        "    row.choice = choice\n"
        "    return VoteResult(True, 'Vote recorded.')\n"
        "st.record_vote = record_vote\n",
    ),
    "a reset that does not wait for the step under way": (
        "tests/test_controls.py::test_reset_waits_for_the_ppo_step_under_way_and_nothing_publishes_over_it",
        "import rlhf_chat.serving.controls as c\nc.wait_until_paused = lambda loop, timeout_s=0: loop.pause()\n",
    ),
    "the streamer shows nothing until the end": (
        "tests/test_candidates.py::test_row_streamer_pushes_each_rows_text_so_far_and_stops_a_row_at_its_eos",
        "import rlhf_chat.generation.candidates as c\nc.RowStreamer.put = lambda self, value: None\n",
    ),
    "the worker runs jobs first come, first served": (
        "tests/test_worker.py::test_queued_jobs_run_most_urgent_first",
        "import rlhf_chat.generation.worker as w\n_submit = w.ModelWorker.submit\n"
        "w.ModelWorker.submit = lambda self, priority, fn: _submit(self, 5, fn)\n",
    ),
    "no yield point inside a training slice": (
        "tests/test_worker.py::test_a_person_waits_at_most_one_step_of_a_training_slice",
        "import rlhf_chat.generation.worker as w\nw.ModelWorker.run_urgent = lambda self: 0\n",
    ),
    "training gets no share of a busy worker (strict priority starves it)": (
        "tests/test_worker.py::test_training_gets_its_share_of_a_worker_that_chat_keeps_busy",
        "import rlhf_chat.generation.worker as w\nw.ModelWorker._training_owed = lambda self: False\n",
    ),
    "a nested chat job's time is charged to the training slice around it": (
        "tests/test_worker.py::test_the_share_is_charged_to_the_nested_job_not_the_slice_around_it",
        "import rlhf_chat.generation.worker as w\n_charge = w.ModelWorker._charge\n"
        "def charge(self):  # to the outermost job under way\n"
        "    nested = self._running[1:]\n"
        "    del self._running[1:]\n"
        "    _charge(self)\n"
        "    self._running.extend(nested)\n"
        "w.ModelWorker._charge = charge\n",
    ),
    "the KL anchor adds nothing (ppo.anchor_loss='kl' silently off)": (
        "tests/test_ppo.py::test_a_kl_anchor_keeps_the_policy_near_the_starting_model_at_its_answers",
        "import torch\nimport rlhf_chat.learning.ppo as p\n"
        "p.reference_kl_loss = lambda models, examples, n: torch.zeros((), requires_grad=True)\n",
    ),
    "the KL anchor's reference pass leaves the adapter on (the policy anchored to itself)": (
        "tests/test_ppo.py::test_a_kl_anchor_keeps_the_policy_near_the_starting_model_at_its_answers",
        "import contextlib\nfrom peft import PeftModel\nPeftModel.disable_adapter = lambda self: contextlib.nullcontext()\n",
    ),
    "the worker trims freed memory only when no job waits (never under load)": (
        "tests/test_worker.py::test_freed_memory_is_given_back_while_jobs_keep_waiting",
        "import rlhf_chat.generation.worker as w\n"
        "w.ModelWorker._between_jobs = lambda self: self._jobs.empty() and self.trimmer.maybe_trim()\n",
    ),
    "reward scoring never gives way to a person (no yield point between batches)": (
        "tests/test_reward.py::test_scoring_many_votes_gives_way_to_a_person_after_each_batch",
        "import rlhf_chat.learning.reward as r\nr.yield_point = lambda: None\n",
    ),
    "due votes start a reward round before PPO's turn (the live loop under load trains no policy)": (
        "tests/test_training_loop.py::test_votes_due_wait_for_ppos_turn_before_the_next_reward_round",
        "import rlhf_chat.learning.training_loop as tl\ntl.ppo_had_its_turn = lambda *a, **k: True\n",
    ),
    "the simulation's reward rounds ignore PPO's turn": (
        "tests/test_simulate.py::test_the_simulations_next_reward_round_waits_for_ppos_turn_as_the_live_loop",
        "import rlhf_chat.learning.training_loop as tl\ntl.ppo_had_its_turn = lambda *a, **k: True\n",
    ),
    "a chunked reward step carries back the first chunk only": (
        "tests/test_reward.py::test_a_batch_too_long_for_one_pass_gets_the_same_step_a_chunk_at_a_time",
        "import rlhf_chat.learning.reward as r\n_chunks = r.token_chunks\n"
        "def backward(models, sequences, grads, max_tokens, cache):\n"
        "    first = _chunks([len(s.ids) for s in sequences], max_tokens)[0]\n"
        "    r.score_sequences(models, [sequences[i] for i in first], cache).backward(grads[first])\n"
        "r.backward_through_scores = backward\n",
    ),
    "no grace for the training loop's next job (chat slips in between every two slices)": (
        "tests/test_worker.py::test_a_training_loop_that_submits_one_job_at_a_time_still_gets_its_share",
        "import rlhf_chat.generation.worker as w\nw.TRAINING_GRACE_S = 0.0\n",
    ),
    "no vote limit": (
        "tests/test_ui.py::test_votes_beyond_the_per_minute_limit_are_refused_and_not_stored",
        "import rlhf_chat.serving.admission as a\na.Admission.vote = lambda self, session_id, address: None\n",
    ),
    "limits per session only (a new client starts afresh)": (
        "tests/test_abuse.py::test_a_new_session_from_the_same_address_does_not_reset_the_vote_limit",
        "import rlhf_chat.serving.admission as a\n"
        "a.Admission._limits = lambda self, n, session_id, address: {f'session:{session_id}': n}\n",
    ),
    "the mode pick ignores the votes": (
        "tests/test_modes.py::test_a_thompson_pick_shows_the_mode_people_choose_in_most_pairs_and_still_compares_the_others",
        "import rlhf_chat.generation.modes as m\n_pick = m.pick_pair\n"
        "m.pick_pair = lambda modes, rng, record=None: _pick(modes, rng)\n",
    ),
    "one sampling call per person": (
        "tests/test_batcher.py::test_people_waiting_together_share_one_call_and_each_sees_only_their_own_rows",
        "import rlhf_chat.serving.batcher as b\n_init = b.PairBatcher.__init__\n"
        "def init(self, worker, cfg, max_people=8, *a, **k):\n"
        "    _init(self, worker, cfg, 1, *a, **k)\n"
        "b.PairBatcher.__init__ = init\n",
    ),
    "the simulation runs PPO past the live loop's KL bound": (
        "tests/test_simulate.py::test_the_simulation_stops_ppo_where_the_kl_bound_stops_the_live_loop",
        "import rlhf_chat.learning.training_loop as tl\ntl.ppo_budget_spent = lambda *a, **k: ''\n",
    ),
    "the simulation runs PPO past the live loop's budget per reward version": (
        "tests/test_simulate.py::test_the_simulation_runs_at_most_the_loops_budget_of_ppo_steps_per_reward_version",
        "import rlhf_chat.learning.training_loop as tl\ntl.ppo_budget_spent = lambda *a, **k: ''\n",
    ),
    "the simulation never asks the tripwire": (
        "tests/test_simulate.py::test_a_tripwire_trip_pauses_the_simulations_training_for_the_rest_of_the_run",
        "import rlhf_chat.learning.training_loop as tl\ntl.tripwire_trip = lambda *a, **k: None\n",
    ),
    "train-reward runs its round on the guards' and the loop's defaults (--set ignored)": (
        "tests/test_cli.py::test_train_reward_and_train_policy_use_every_set_setting",
        "import rlhf_chat.learning.reward as r\n"
        "r.reward_round_from_config = lambda w, s, cfg, seed=0, score_unseen=True: "
        "r.run_round(w, s, cfg.reward, cfg.store.checkpoint_dir, seed=seed)\n",
    ),
    "train-policy builds its PPO trainer without the guards, weights and tie weight": (
        "tests/test_cli.py::test_train_reward_and_train_policy_use_every_set_setting",
        "import rlhf_chat.learning.ppo as p\n"
        "p.PPOTrainer.from_config = classmethod(lambda cls, w, s, cfg, score_fn=None: "
        "cls(w, s, cfg.ppo, cfg.store.checkpoint_dir, sampling=cfg.sampling))\n",
    ),
    "a crash mid-update is not undone": (
        "tests/test_training_loop.py::test_a_crash_mid_update_restores_the_policy_and_retries_with_back_off",
        "import rlhf_chat.learning.ppo as ppo\nppo.restore = lambda models, optimizer, saved: None\n",
    ),
    "a policy version published before its checkpoint is saved": (
        "tests/test_training_loop.py::test_a_full_disk_publishes_no_policy_version_without_its_checkpoint",
        "import rlhf_chat.learning.ppo as ppo\n_save = ppo.PPOTrainer.save\n"
        "def step_publishing_first(self, contexts, _real=ppo.PPOTrainer.step):\n"
        "    self.worker.call(2, ppo.publish)\n"
        "    return _real(self, contexts)\n"
        "ppo.PPOTrainer.step = step_publishing_first\n",
    ),
    "a replica loads a checkpoint without checking its checksum": (
        "tests/test_replicas.py::test_a_partial_or_missing_checkpoint_is_refused_and_the_replica_keeps_serving",
        "import rlhf_chat.learning.checkpoints as c, rlhf_chat.serving.follower as f, rlhf_chat.learning.ppo as ppo\n"
        "f.load_verified = ppo.load_verified = lambda path, expected: c.load_checkpoint(path)\n",
    ),
    "a serve replica never follows the trainer": (
        "tests/test_replicas.py::test_a_published_policy_reaches_the_replica_whole_and_is_what_it_serves",
        "import rlhf_chat.serving.follower as f\nf.PolicyFollower.check_once = lambda self: False\n",
    ),
    "a second trainer takes a live lease": (
        "tests/test_lease.py::test_a_second_trainer_is_refused_with_the_holders_host_and_heartbeat_age",
        "import rlhf_chat.storage.lease as l\n_take = l.take\n"
        "l.take = lambda sessions, me, ttl_s, now=None: _take(sessions, me, -1e12, now)\n",
    ),
    "written answers never reach the LM term": (
        "tests/test_demonstrations.py::test_a_few_written_answers_teach_the_plain_policy_their_behaviour",
        "import rlhf_chat.learning.ppo as ppo\nppo.demonstrated_answers = lambda *a, **k: []\n",
    ),
    "the demonstration weight is ignored by the reward model": (
        "tests/test_demonstrations.py::test_the_demonstration_weight_changes_both_updates",
        "import rlhf_chat.learning.reward as r\nr.pair_weights = lambda pairs, device: None\n",
    ),
    "the reward step clips its gradient at norm 2, not 1": (
        "tests/test_reward.py::test_a_reward_step_clips_the_gradient_to_norm_one_and_skips_a_non_finite_loss",
        "import torch\n_clip = torch.nn.utils.clip_grad_norm_\n"
        "torch.nn.utils.clip_grad_norm_ = lambda params, norm, *a, **k: _clip(params, 2 * norm, *a, **k)\n",
    ),
    "score_texts drops the first answer": (
        "tests/test_reward.py::test_score_texts_gives_one_score_per_answer_in_order_across_chunks",
        "import rlhf_chat.learning.reward as r\n_score = r.score_texts\n"
        "r.score_texts = lambda models, c, a, n, batch_size=16, finished=None: "
        "_score(models, c[1:], a[1:], n, batch_size, finished[1:] if finished else None)\n",
    ),
    "the guards weigh every contributor alike (no cap, no flag)": (
        "tests/test_guards.py::test_the_influence_cap_holds_in_a_reward_rounds_pairs",
        "import rlhf_chat.learning.guards as g\n"
        "g.feedback_weights = lambda items, table, share, enabled=True: [i.weight for i in items]\n",
    ),
    "the reward model's agreement is never stored": (
        "tests/test_guards.py::test_a_reward_round_scores_only_the_votes_no_round_trained_on",
        "import rlhf_chat.learning.reward as r\nr.score_unseen_votes = lambda *a, **k: 0\n",
    ),
    "the tripwire never trips": (
        "tests/test_guards.py::test_the_tripwire_pauses_the_live_loop_rolls_back_and_keeps_serving",
        "import rlhf_chat.learning.tripwire as t\nt.check = lambda *a, **k: None\n",
    ),
    "written answers with a link train anyway": (
        "tests/test_guards.py::test_written_answers_with_an_address_or_a_link_are_never_trained_on",
        "import rlhf_chat.learning.guards as g\ng.written_answer_problems = lambda text, lo, hi: []\n",
    ),
    "the decoder ignores the adapter": (
        "tests/test_decoder.py::test_prefill_gives_the_models_own_logits_for_policy_and_reference_rows",
        "import rlhf_chat.model.decoder as d\nd.split_lora = lambda module, adapter: (getattr(module, 'base_layer', module), None)\n",
    ),
    "ties never reach the reward model": (
        "tests/test_reward.py::test_ties_teach_the_reward_model_that_length_is_not_the_taste",
        "import rlhf_chat.learning.reward as r\nr.tie_pairs = lambda comparisons, weight: []\n",
    ),
    "an exclusion misses somebody who only ties": (
        "tests/test_guards.py::test_an_exclusion_reaches_the_ties_of_somebody_who_only_ties",
        "import rlhf_chat.learning.guards as g\n_at = g.agreement_table\n"
        "g.agreement_table = lambda votes, written, excluded, rules, ties=(): _at(votes, written, excluded, rules)\n",
    ),
    "a tie is scored as a vote for A": (
        "tests/test_reward.py::test_ties_teach_the_reward_model_that_length_is_not_the_taste",
        "import rlhf_chat.learning.reward as r\nr.pair_targets = lambda pairs, device: None\n",
    ),
    "a shared prompt is prefilled once per row": (
        "tests/test_decoder.py::test_rows_with_one_prompt_are_prefilled_once_and_get_the_models_own_logits",
        "import torch, rlhf_chat.model.decoder as d\n"
        "d.Twins.of = classmethod(lambda cls, rows: cls(torch.arange(rows.shape[0]), torch.arange(rows.shape[0])))\n",
    ),
    "the native MLP leaves out the residual": (
        "tests/test_native.py::test_the_native_mlp_is_the_llama_mlp_plus_its_input",
        "import rlhf_chat.model.native as n\n_mlp = n.int4_mlp\n"
        "n.int4_mlp = lambda cache, hidden, *a: _mlp(cache, hidden, *a) - hidden\n",
    ),
    "the native attention step writes its keys into a copy of the cache": (
        "tests/test_native.py::test_the_native_attention_step_is_the_llama_attention_plus_its_input",
        "import rlhf_chat.model.native as n\n_step = n.int4_attention_step\n"
        "n.int4_attention_step = lambda c, h, w, e, qkv, o, hd, kv, keys, values, *a: "
        "_step(c, h, w, e, qkv, o, hd, kv, keys.clone(), values.clone(), *a)\n",
    ),
    "the decoder never runs an answer's last token through the frozen layers": (
        "tests/test_decoder.py::test_the_kept_frozen_output_is_the_models_own_at_every_answer_token",
        "import rlhf_chat.model.decoder as d\nd.Decoder.tap_last = lambda self, batch, tokens: None\n",
    ),
    "the first update's forward fills the policy terms in minibatch order": (
        "tests/test_ppo.py::test_the_first_update_forward_is_the_scoring_pass_it_replaces",
        "import rlhf_chat.learning.ppo as p\n"
        "p.in_row_order = lambda idx, rows, *tensors: [t.detach() for t in tensors]\n",
    ),
    "every rollout row that does not round-trip re-scores the whole batch": (
        "tests/test_reward.py::test_a_rollout_answer_that_does_not_round_trip_is_scored_in_the_stored_layout",
        "import rlhf_chat.learning.ppo as p\n_rms = p.reward_model_scores\n"
        "p.reward_model_scores = lambda m, b: p.score_sequences(m, p.stored_layout(m, b))\n",
    ),
    "the context labeler always ties": (
        "tests/test_questions.py::test_context_wants_the_fact_for_a_factual_question",
        "import rlhf_chat.evaluation.labelers as l\nl.context = lambda prompt, a, b: 'tie'\n",
    ),
    "the context labeler wants a question back whatever the question": (
        "tests/test_questions.py::test_context_wants_the_fact_for_a_factual_question",
        "import rlhf_chat.evaluation.labelers as l\nl.context = l.follow_up\n",
    ),
    "the content measure passes every answer": (
        "tests/test_questions.py::test_an_echo_or_a_canned_phrase_is_not_content",
        "import rlhf_chat.text.questions as q\nq.gives_content = lambda prompt, text: True\n",
    ),
    "the tax's reference NLL keeps the policy adapter on": (
        "tests/test_questions.py::test_the_nll_reads_the_policy_with_its_adapter_and_the_reference_without",
        "import contextlib\nfrom peft import PeftModel\nPeftModel.disable_adapter = lambda self: contextlib.nullcontext()\n",
    ),
    "the tax measures the reference's answers on both sides": (
        "tests/test_questions.py::test_a_policy_that_answers_with_a_canned_question_shows_the_loss",
        "import rlhf_chat.learning.tax as t\n_side = t.measure_side\n"
        "t.measure_side = lambda *a, reference=False, **k: _side(*a, reference=True, **k)\n",
    ),
    "answer-first modes write nothing after the answer's first sentence": (
        "tests/test_modes.py::test_an_answer_first_opening_follows_the_answers_first_sentence",
        "import rlhf_chat.generation.candidates as c\nc.continue_after_heads = lambda m, t, rows, written, *a: written\n",
    ),
    "PPO-ptx's anchor draws no reference answers": (
        "tests/test_ppo.py::test_ptx_anchor_keeps_the_starting_models_own_answers_likely",
        "from rlhf_chat.learning.ppo import PPOTrainer\nPPOTrainer.reference_examples = lambda self: []\n",
    ),
    "a checkpointed policy's tax is never measured": (
        "tests/test_ppo.py::test_each_checkpointed_policy_stores_its_alignment_tax_against_the_starting_model",
        "from rlhf_chat.learning.ppo import PPOTrainer\nPPOTrainer.record_tax = lambda self, version: None\n",
    ),
    "the tripwire never reads the tax": (
        "tests/test_guards.py::test_the_tax_trip_rolls_back_a_policy_that_forgets_what_the_starting_model_knew",
        "import rlhf_chat.learning.tripwire as t\nt.tax_trip = lambda *a, **k: None\n",
    ),
    "per-kind mode records are the global record": (
        "tests/test_modes.py::test_a_per_kind_record_counts_the_kinds_own_votes_and_a_quarter_of_the_rest",
        "import rlhf_chat.generation.modes as m\nm.OTHER_KINDS_WEIGHT = 1.0\n",
    ),
    "pruning ignores the tripwire's roll-back target": (
        "tests/test_faults.py::test_pruning_keeps_the_newest_and_the_protected_and_a_restart_serves_the_newest",
        "import rlhf_chat.learning.checkpoints as c\n_prune = c.prune_checkpoints\n"
        "c.prune_checkpoints = lambda sessions, kind, keep, protect=frozenset(): _prune(sessions, kind, keep)\n",
    ),
    "the loop never prunes": (
        "tests/test_faults.py::test_the_loop_prunes_both_kinds_and_keeps_the_tripwires_target",
        "import rlhf_chat.learning.training_loop as t\nt.prune_checkpoints = lambda *a, **k: []\n",
    ),
    "PPO serves on past the KL bound": (
        "tests/test_ppo.py::test_a_policy_whose_rollouts_pass_the_kl_bound_gives_way_to_the_last_one_within_it",
        "import rlhf_chat.learning.ppo as p\np.PPOTrainer._serve_within_bound = lambda self, kl: self._call(p.publish)\n",
    ),
    "the flag always trusts (issue 41)": (
        "tests/test_guards.py::test_an_always_longer_voter_is_flagged_and_the_honest_crowd_that_ties_often_is_not",
        "import rlhf_chat.learning.guards as g\ng.assess = lambda agreements, n, rules: False\n",
    ),
    "the flag trusts the reward model the suspect helped train (issue 41)": (
        "tests/test_guards.py::test_the_stored_flag_trusts_the_crowd_not_a_captured_reward_model",
        "import rlhf_chat.learning.guards as g\n"
        "def circular(votes, excluded, rules):\n"
        "    out = {}\n"
        "    for v in votes:\n"
        "        for who in (('session', v.session), ('client', v.client)):\n"
        "            if who[1] and v.rm_agrees is not None:\n"
        "                a, n = out.get(who, (0, 0))\n"
        "                out[who] = (a + int(v.rm_agrees), n + 1)\n"
        "    return out\n"
        "g.consensus_agreement = circular\n",
    ),
    "the tripwire never looks at whom the guards silence (issue 41)": (
        "tests/test_guards.py::test_the_tripwire_pauses_when_the_flags_silence_most_of_the_feedback",
        "import rlhf_chat.learning.tripwire as t\nt.trust_trip = lambda *a, **k: None\n",
    ),
    "the tripwire counts nobody as newly trusted (issue 41)": (
        "tests/test_guards.py::test_the_tripwire_pauses_when_contributors_the_last_round_did_not_trust_carry_the_next",
        "import rlhf_chat.learning.tripwire as t\nt.newly_trusted = lambda now, before: (0.0, [])\n",
    ),
    "a minibatch update holds every term's graph until one backward of their sum": (
        "tests/test_ppo.py::test_a_minibatch_update_sends_each_term_back_alone_with_the_gradients_of_their_sum",
        "import torch\nimport rlhf_chat.learning.ppo as ppo\nheld = []\n"
        "def hold(loss):\n    held.append(loss)\n    return loss.item()\n"
        "real_clip = torch.nn.utils.clip_grad_norm_\n"
        "def clip(params, max_norm):\n    if held:\n        sum(held).backward()\n        held.clear()\n"
        "    return real_clip(params, max_norm)\n"
        "ppo.backward_if_finite = hold\ntorch.nn.utils.clip_grad_norm_ = clip\n",
    ),
    "model.recompute_top_layers silently does nothing": (
        "tests/test_ppo.py::test_recomputing_the_top_layers_makes_the_same_update_with_less_kept_for_backward",
        "import rlhf_chat.model.heads as h\n_real = h.top_hidden\n"
        "def top_hidden(peft_model, prefix, recompute=False):\n    return _real(peft_model, prefix, False)\n"
        "h.top_hidden = top_hidden\n"
        "import rlhf_chat.learning.ppo as p, rlhf_chat.learning.supervised as s\np.top_hidden = s.top_hidden = top_hidden\n",
    ),
}

PLUGIN = '''
import pytest

def pytest_configure(config):
    exec(compile(STUB, "<stub>", "exec"), {})
'''


def run(name: str, test: str, stub: str) -> bool:
    """True when the test fails with the stub applied (as it must)."""
    plugin = ROOT / "_stub_plugin.py"
    plugin.write_text(f"STUB = {stub!r}\n" + PLUGIN)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "_stub_plugin", test],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            plugin.unlink()
    # caught: the test failed on an assertion (not on an error the stub itself raised)
    failures = [line for line in result.stdout.splitlines() if line.startswith("E ")]
    caught = result.returncode == 1 and any("assert" in line.lower() or "Failed" in line for line in failures)
    why = next((line[1:].strip() for line in failures), "")[:110]
    print(f"{'caught ' if caught else 'MISSED '} {name}\n         {test}\n         {why}", flush=True)
    return caught


def main() -> int:
    wanted = " ".join(sys.argv[1:])
    chosen = {k: v for k, v in STUBS.items() if wanted in k}
    missed = [name for name, (test, stub) in chosen.items() if not run(name, test, stub)]
    print(f"\n{len(chosen) - len(missed)} of {len(chosen)} stubs caught by their tests")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
