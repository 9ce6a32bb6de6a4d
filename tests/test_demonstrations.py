"""Written answers ("write a better answer"): stored once, committed before they are
acknowledged, continuing the conversation; bad input refused with a reason; in
the export; and teaching both learners, with a weight that changes the update."""

from __future__ import annotations

import json

import pytest
import torch
from sqlalchemy import select

from rlhf_chat.learning.preferences import demonstration_pairs
from rlhf_chat.learning.reward import pair_weights
from rlhf_chat.runtime import start_services
from rlhf_chat.serving.controls import export_feedback
from rlhf_chat.serving.handlers import ChatState, respond, start_from, submit_demonstration, vote
from rlhf_chat.storage import store
from rlhf_chat.storage.tables import Demonstration, Message

OUT_CHATBOT, OUT_NOTICE, OUT_STATE, OUT_BOX = 0, 3, 11, 12


@pytest.fixture
def services(tiny_config):
    services = start_services(tiny_config, train=False)
    assert services.worker.ready.wait(120)
    yield services
    services.worker.stop()


def pair_on_screen(services, text="How do I make tea?", state=None) -> ChatState:
    *_, final = respond(services, text, state)
    assert final[OUT_STATE].phase == "vote"
    return final[OUT_STATE]


def stored_demonstrations(services) -> list[Demonstration]:
    with services.sessions() as session:
        return store.demonstrations(session)


def test_an_edited_answer_is_stored_continues_the_conversation_and_is_exported(services, tmp_path):
    state = pair_on_screen(services)
    box, started = start_from("b", state)
    assert box["value"] == state.pair[1] and started == "b"
    shown, pair_id = state.pair, state.pair_id
    mine = "Boil water, pour it over a tea bag, wait three minutes. Do you take milk?"
    out = submit_demonstration(services, mine, "b", state)
    assert out[OUT_NOTICE].startswith("Recorded: your answer")
    assert out[OUT_BOX]["value"] == ""  # stored, so the box may clear
    after = out[OUT_STATE]
    assert after.phase == "chat" and after.pair_id is None
    assert after.history[-1] == {"role": "assistant", "content": mine}
    assert out[OUT_CHATBOT][-1]["content"] == mine
    (demo,) = stored_demonstrations(services)  # committed before it was acknowledged
    assert (demo.comparison_id, demo.text, demo.started_from, demo.session_id) == (pair_id, mine, "b", state.session_id)
    assert demo.context == [{"role": "user", "content": "How do I make tea?"}]
    with services.sessions() as session:
        kept = session.scalars(select(Message).where(Message.conversation_id == after.conversation_id)).all()
    assert [m.content for m in kept][-1] == mine  # the conversation goes on with it, stored

    # and the conversation continues after it
    *_, final = respond(services, "Thanks! And green tea?", after)
    assert final[OUT_STATE].phase == "vote"

    (prefs, sft), message = export_feedback(services.sessions, tmp_path)
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    written = [r for r in rows if r["source"] == "demonstration"]
    assert sorted(r["rejected"] for r in written) == sorted(shown) and {r["chosen"] for r in written} == {mine}
    (sft_row,) = [json.loads(line) for line in sft.read_text().splitlines()]
    assert sft_row["messages"][-1] == {"role": "assistant", "content": mine} and sft_row["started_from"] == "b"
    assert "1 written answers" in message and "(2 from written answers)" in message


def test_bad_written_answers_are_refused_with_a_reason_and_nothing_is_stored(services):
    state = pair_on_screen(services)
    limit = services.config.sampling.max_message_chars
    for text, reason in (
        ("   \u200b ", "Your answer is empty"),
        ("x" * (limit + 1), f"the limit is {limit:,}"),
        (state.pair[0], "That is answer A unchanged"),
    ):
        out = submit_demonstration(services, text, "a", state)
        assert reason in out[OUT_NOTICE], out[OUT_NOTICE]
        assert out[OUT_BOX] == {"__type__": "update"}  # the text stays in the box, to be fixed
        assert out[OUT_STATE].phase == "vote"
    assert stored_demonstrations(services) == []
    fresh = ChatState()
    assert "no pair" in submit_demonstration(services, "An answer.", "", fresh)[OUT_NOTICE]
    assert start_from("a", fresh) == ({"__type__": "update"}, "")


def test_a_double_submit_and_a_stale_pair_store_nothing_more(services):
    state = pair_on_screen(services)
    stale_id, stale = state.pair_id, ChatState(**{**vars(state)})
    submit_demonstration(services, "A first answer of my own.", "", state)
    again = submit_demonstration(services, "A second answer.", "", stale)  # the other tab still shows the pair
    assert "already wrote an answer for this pair" in again[OUT_NOTICE]
    with services.sessions() as session:  # a newer pair in the conversation makes the old one stale
        pair_on_screen(services, "And coffee?", state)
        result = store.add_demonstration(session, stale_id, state.session_id, "Late answer.")
    assert not result.ok
    assert [d.text for d in stored_demonstrations(services)] == ["A first answer of my own."]


def test_after_both_bad_a_written_answer_closes_the_pair_and_the_flood_limit_applies(services):
    services.config.ui.votes_per_minute = 2
    state = pair_on_screen(services)
    out = vote(services, "both_bad", None, state)
    assert out[OUT_STATE].phase == "regenerate"
    done = submit_demonstration(services, "What I wanted to read.", "", out[OUT_STATE])
    assert done[OUT_NOTICE].startswith("Recorded") and done[OUT_STATE].phase == "chat"
    state = pair_on_screen(services, "One more question?", done[OUT_STATE])
    refused = submit_demonstration(services, "Another answer.", "", state)  # the third feedback in a minute
    assert "voting very fast" in refused[OUT_NOTICE]
    assert len(stored_demonstrations(services)) == 1


def test_a_written_answer_is_preferred_over_both_shown_answers_with_its_weight(services):
    state = pair_on_screen(services)
    shown = state.pair
    submit_demonstration(services, "My own answer.", "a", state)
    (demo,) = stored_demonstrations(services)
    pairs = demonstration_pairs([demo], weight=3.0)
    assert [(p.chosen, p.rejected) for p in pairs] == [("My own answer.", shown[0]), ("My own answer.", shown[1])]
    assert all(p.weight == 3.0 and p.source == "demonstration" and p.chosen_finished for p in pairs)
    assert all(p.comparison_id == demo.comparison_id for p in pairs)  # the held-out split keeps the pair's side
    assert torch.equal(pair_weights(pairs, torch.device("cpu")), torch.tensor([3.0, 3.0]))
    assert pair_weights(demonstration_pairs([demo], 1.0), torch.device("cpu")) is None  # one vote each: the plain mean


# --- learning from written answers, on the tiny model ---------------------------------------

ASKED = "Could you? Would you? Can you? Do you?"  # short questions to the reader (see test_ppo)


def store_written_answers(sessions, contexts) -> None:
    """Plain pairs nobody voted on, each with a written answer that asks back."""
    from rlhf_chat.generation.candidates import Candidate

    with sessions() as s, s.begin():
        for ctx in contexts:
            shown = [Candidate(t, "policy", 0, 0, 0.7, 1.0, 10, 3, True, 0.1) for t in ("Tea is a drink.", "It is tea.")]
            pair = store.save_pair(s, session_id="t", context=ctx, a=shown[0], b=shown[1])
            assert store.add_demonstration(s, pair.id, "t", ASKED, "").ok


def test_a_few_written_answers_teach_the_plain_policy_their_behaviour(tiny_config, monkeypatch):
    """Four written answers that ask back raise the plain policy's share of answers
    that ask, on prompts it never saw; with the demonstration path stubbed out (no
    written answer reaches the LM term) the same steps leave it at zero."""
    from rlhf_chat.generation.worker import ModelWorker
    from rlhf_chat.learning import ppo as ppo_module
    from rlhf_chat.learning.ppo import PPOTrainer, rollout
    from rlhf_chat.model.loading import load_models
    from rlhf_chat.text.behaviours import asks_question
    from tests.test_ppo import CONTEXTS, SAMPLING, tiny_ppo_config

    sessions = store.open_store(tiny_config.store.db_url)
    store_written_answers(sessions, CONTEXTS)
    unseen = [[{"role": "user", "content": q}] for q in ("why is the sea salty?", "how do birds fly?")]

    def share_after() -> tuple[float, float]:
        worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
        try:
            cfg = tiny_ppo_config(ptx_coef=5.0, learning_rate=1e-2, ptx_batch=4)  # ptx_from "modes": no votes count
            trainer = PPOTrainer(worker, sessions, cfg, tiny_config.store.checkpoint_dir,
                                 lambda m, b: torch.zeros(b.response_ids.shape[0]), SAMPLING)
            trainer.rng.seed(0)

            def share() -> float:
                sampling = type(SAMPLING)(max_new_tokens=14, temperature=0.7)
                texts = worker.call(0, lambda m: rollout(m, unseen * 8, tiny_ppo_config(), sampling, seed=5).texts)
                return sum(map(asks_question, texts)) / len(texts)

            before = share()
            for _ in range(12):
                trainer.step(CONTEXTS * 2)
            return before, share()
        finally:
            worker.stop()

    before, taught = share_after()
    monkeypatch.setattr(ppo_module, "demonstrated_answers", lambda *args: [])
    _, stub = share_after()
    assert before == 0.0 and stub == 0.0
    assert taught >= 0.3, taught


def test_the_demonstration_weight_changes_both_updates(tiny_config, tmp_path):
    """``loop.demonstration_weight`` is not a label: a reward round and a PPO step on the
    same votes and written answers end with other weights when it changes."""
    from rlhf_chat.config import GuardConfig
    from rlhf_chat.generation.candidates import Candidate
    from rlhf_chat.generation.worker import ModelWorker
    from rlhf_chat.learning.ppo import PPOTrainer, policy_tensors
    from rlhf_chat.learning.reward import reward_tensors, run_round
    from rlhf_chat.model.loading import load_models
    from tests.test_ppo import CONTEXTS, SAMPLING, tiny_ppo_config

    cfg = tiny_config.reward
    cfg.steps_per_round, cfg.min_pairs, cfg.heldout_fraction = 6, 2, 0.0
    # The votes and the answers come from two sessions here, and the influence cap would
    # hold each to half of the round whatever the weight: the weight is what is measured.
    unguarded = GuardConfig(enabled=False)

    def trained(weight: float, run: str) -> tuple[dict, dict]:
        sessions = store.open_store(f"sqlite:///{tmp_path / run}.db")  # the same feedback, a database per run
        store_written_answers(sessions, CONTEXTS)
        with sessions() as s, s.begin():  # and plain votes beside them
            for i, ctx in enumerate(CONTEXTS):
                shown = [Candidate(t, "policy", 0, 0, 0.7, 1.0, 10, 3, True, 0.1) for t in ("Yes.", f"No, {i} times no.")]
                store.record_vote(s, store.save_pair(s, session_id="v", context=ctx, a=shown[0], b=shown[1]).id, "a")
        worker = ModelWorker(lambda: load_models(tiny_config.model)).start()
        try:
            assert run_round(worker, sessions, cfg, str(tmp_path / run), demonstration_weight=weight, guard_cfg=unguarded)
            reward = worker.call(0, lambda m: {k: v.clone() for k, v in reward_tensors(m).items()})
            ppo_cfg = tiny_ppo_config(ptx_coef=1.0, ptx_batch=8, ptx_from="all")  # written beside chosen answers
            trainer = PPOTrainer(worker, sessions, ppo_cfg, str(tmp_path / run),
                                 lambda m, b: torch.zeros(b.response_ids.shape[0]), SAMPLING, demonstration_weight=weight,
                                 guard_cfg=unguarded)
            trainer.rng.seed(0)
            trainer.step(CONTEXTS * 2)
            policy = worker.call(0, lambda m: {k: v.clone() for k, v in policy_tensors(m).items()})
        finally:
            worker.stop()
        return reward, policy

    reward_1, policy_1 = trained(1.0, "one")
    reward_1b, _ = trained(1.0, "one-again")
    reward_4, policy_4 = trained(4.0, "four")
    assert all(torch.allclose(reward_1[k], reward_1b[k]) for k in reward_1)  # the same weight: the same round
    assert any(not torch.allclose(reward_1[k], reward_4[k]) for k in reward_1)
    assert any(not torch.allclose(policy_1[k], policy_4[k]) for k in policy_1)
