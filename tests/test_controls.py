"""Controls: the admin check, input validation, and pause / β / learning rate / reset /
rollback on a live loop over the tiny model (with the before/after probes as witness)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import torch

from rlhf_chat.config import AppConfig
from rlhf_chat.learning import interventions
from rlhf_chat.learning.ppo import make_optimizer, policy_tensors
from rlhf_chat.learning.training_loop import TrainingLoop
from rlhf_chat.model.loading import POLICY, adapter_state, sync_policy_weights
from rlhf_chat.runtime import start_services
from rlhf_chat.serving import admin, controls
from rlhf_chat.serving.admission import AdminGuard
from rlhf_chat.serving.controls import ControlError, check_admin
from rlhf_chat.serving.dashboard import ProbeBoard
from rlhf_chat.storage.tables import Checkpoint, TrainingEvent


def config_with_password(password: str) -> AppConfig:
    cfg = AppConfig()
    cfg.ui.admin_password = password
    return cfg


def test_check_admin():
    cfg = config_with_password("correct horse ✓")
    assert check_admin("correct horse ✓", cfg)
    assert not check_admin("correct horse", cfg) and not check_admin("", cfg) and not check_admin(None, cfg)
    unset = config_with_password("")
    assert not check_admin("", unset) and not check_admin("anything", unset)  # no password: no admin


def test_bad_values_are_refused_with_a_reason():
    services = SimpleNamespace(loop=None)
    for value in (-0.1, float("nan"), "abc", None):
        with pytest.raises(ControlError, match="β"):
            controls.set_kl_coef(services, value)
    for value in (0, 1, -1e-4, float("inf")):
        with pytest.raises(ControlError, match="learning rate"):
            controls.set_learning_rate(services, value)
    with pytest.raises(ControlError, match="not running"):
        controls.pause(services)  # no loop in this process


def test_every_admin_handler_checks_the_password(monkeypatch, tmp_path):
    monkeypatch.setattr(admin, "WRONG_PASSWORD_DELAY_S", 0.0)
    cfg = config_with_password("a long enough password")
    services = SimpleNamespace(config=cfg, sessions=None, admin_guard=AdminGuard(cfg.ui), address=lambda r: "local")
    called = []
    message, _ = asyncio.run(admin.admin_control(services, lambda s: called.append(s) or "done", "wrong"))
    assert message.startswith("Not authorised") and called == []  # the action never ran
    panel, message, _, _ = asyncio.run(admin.unlock(services, "wrong"))
    assert panel["visible"] is False and message == "Wrong password."
    file, message = asyncio.run(admin.admin_export(services, ""))
    assert file["visible"] is False and message.startswith("Not authorised")
    message, _ = asyncio.run(admin.admin_modes(services, lambda s, *a: called.append(a) or "done", "wrong", "riddle"))
    assert message.startswith("Not authorised") and called == []
    services.sessions = lambda: pytest.fail("a refused request must not read the database")
    asyncio.run(admin.admin_control(services, lambda s: "done", None))


def test_wrong_passwords_lock_an_address_out_are_logged_and_never_hold_a_thread(monkeypatch, caplog):
    cfg = config_with_password("a long enough password")
    cfg.ui.admin_max_failures = 3
    now = [0.0]
    guard = AdminGuard(cfg.ui, clock=lambda: now[0])
    addresses = {"attacker": "203.0.113.9", "admin": "198.51.100.1"}
    services = SimpleNamespace(config=cfg, sessions=None, admin_guard=guard, address=lambda r: addresses[r])
    with caplog.at_level("WARNING"):
        for _ in range(3):
            assert asyncio.run(admin.unlock(services, "guess", request="attacker"))[1] == "Wrong password."
    assert "203.0.113.9" in caplog.text  # each failure is logged with its address
    # locked: even the right password is refused from that address, without being checked
    assert asyncio.run(admin.unlock(services, "a long enough password", request="attacker"))[1] == admin.LOCKED_OUT
    message, _ = asyncio.run(admin.admin_control(services, lambda s: "done", "a long enough password", request="attacker"))
    assert message == admin.LOCKED_OUT
    # another address is not affected, and the lock ends after admin_lockout_s
    assert asyncio.run(admin._admin_refusal(services, "a long enough password", "admin", "refused")) is None
    now[0] += cfg.ui.admin_lockout_s + 1
    assert not guard.locked("203.0.113.9")

    # ten wrong guesses at once take about one delay, not ten: the waits share the event loop
    monkeypatch.setattr(admin, "WRONG_PASSWORD_DELAY_S", 0.5)
    cfg.ui.admin_max_failures = 100

    async def ten_guesses():
        return await asyncio.gather(*(admin.unlock(services, "guess", request="admin") for _ in range(10)))

    start = time.perf_counter()
    asyncio.run(ten_guesses())
    assert time.perf_counter() - start < 2.0


def test_the_app_refuses_a_short_admin_password():
    from rlhf_chat.config import apply_overrides, validate

    with pytest.raises(ValueError, match="at least 12"):
        validate(config_with_password("hunter2"))
    with pytest.raises(ValueError, match="at least 12"):
        apply_overrides(AppConfig(), ["ui.admin_password=short"])
    assert validate(config_with_password("")) and validate(config_with_password("twelve chars"))


# --- on a live loop over the tiny model ----------------------------------------------------


@pytest.fixture(scope="module")
def services(tiny_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("controls")
    cfg = AppConfig()
    cfg.model.name = str(tiny_path)
    cfg.store.db_url = f"sqlite:///{tmp / 'feedback.db'}"
    cfg.store.checkpoint_dir = str(tmp / "checkpoints")
    services = start_services(cfg, train=False)
    assert services.worker.ready.wait(120)
    services.loop = TrainingLoop(services.worker, services.sessions, cfg).start()  # waits for votes: no training
    yield services
    services.stop()


def lora_b(models, copy: str) -> list[torch.Tensor]:
    model = models.trainer if copy == "trainer" else models.serving
    return [p.detach().clone() for n, p in adapter_state(model, POLICY).items() if "lora_B" in n]


def test_pause_resume_beta_and_learning_rate(services):
    loop = services.loop
    controls.wait_until_paused(loop, timeout_s=30)
    assert loop.paused and loop.status.state == "paused"
    assert controls.resume(services) == "Training resumed." and not loop.paused
    assert "paused" in controls.pause(services) and loop.paused
    controls.resume(services)

    controls.set_kl_coef(services, 0.2)
    assert loop.ppo.kl_ctl.value == 0.2
    loop.ppo.optimizer = services.worker.call(0, lambda m: make_optimizer(m, loop.ppo.cfg))
    controls.set_learning_rate(services, "3e-5")
    groups = loop.ppo.optimizer.param_groups
    assert groups[0]["lr"] == 3e-5 and groups[1]["lr"] == pytest.approx(3e-5 * loop.ppo.cfg.value_head_lr_mult)
    assert loop.ppo.cfg.learning_rate == 3e-5  # the next fresh optimizer starts from it


def test_reset_and_rollback_publish_new_versions(services):
    loop, worker = services.loop, services.worker
    board = ProbeBoard(max_new_tokens=8)

    def perturb(models):  # stand-in for trained weights, saved as checkpoint v3
        torch.manual_seed(0)
        with torch.no_grad():
            for p in policy_tensors(models).values():
                p.normal_(std=0.5)
        sync_policy_weights(models.trainer, models.serving)
        models.serving_version = 3

    worker.call(0, perturb)
    loop.ppo.save(3)
    trained = worker.call(0, lambda m: {k: v.detach().clone() for k, v in policy_tensors(m).items()})
    assert board.answers(worker, wait=True).version == 3
    loop.ppo.optimizer = worker.call(0, lambda m: make_optimizer(m, loop.ppo.cfg))

    # reset: the policy equals the reference, under a new version, saved, training resumed
    assert controls.reset_policy(services) == "Policy reset to the base model; now serving v4."
    models = worker.call(0, lambda m: m)  # read-only look, for the test
    assert worker.serving_version == 4 and not loop.paused and loop.ppo.optimizer is None
    assert all(b.abs().max() == 0 for b in lora_b(models, "trainer") + lora_b(models, "serving"))
    assert all(p.abs().max() == 0 for p in models.value_head.parameters())
    probes = board.answers(worker, wait=True)
    assert probes.version == 4 and probes.policy == probes.reference  # one seed: same weights, same words

    # rollback to v3: its weights again, as v5
    with pytest.raises(ControlError, match="no policy checkpoint v7"):
        controls.rollback(services, 7)
    controls.pause(services)  # an admin's pause survives a rollback
    assert controls.rollback(services, 3) == "Rolled back to v3; now serving it as v5."
    assert worker.serving_version == 5 and loop.paused and loop.ppo.optimizer is None
    now = worker.call(0, lambda m: {k: v.detach().clone() for k, v in policy_tensors(m).items()})
    assert all(torch.equal(now[k], trained[k]) for k in trained)
    assert all(torch.equal(a, b) for a, b in zip(lora_b(models, "trainer"), lora_b(models, "serving")))
    controls.resume(services)

    with services.sessions() as session:
        saved = {c.version: c.extra for c in session.query(Checkpoint).filter_by(kind="policy")}
        events = [e.message for e in session.query(TrainingEvent)]
    assert saved[4]["reset"] is True and saved[5]["rolled_back_to"] == 3  # a restart serves them
    assert controls.policy_versions(services.sessions) == [5, 4, 3]
    assert any("reset" in e for e in events) and any("rolled the policy back to v3" in e for e in events)


def test_reset_waits_for_the_ppo_step_under_way_and_nothing_publishes_over_it(tiny_config, monkeypatch):
    """A reset pressed while a PPO step is in flight: the step finishes (or is never
    started) before the policy changes, and no step publishes over the reset."""
    import random
    import threading
    import time

    from rlhf_chat.evaluation.labelers import concise
    from rlhf_chat.evaluation.simulate import collect_votes
    from rlhf_chat.learning import ppo
    from rlhf_chat.learning.reward import run_round

    cfg = tiny_config
    cfg.loop.reward_every_votes, cfg.loop.ppo_steps_per_reward = 1000, 0
    cfg.reward.steps_per_round, cfg.reward.min_pairs = 5, 2
    cfg.ppo.batch_size, cfg.ppo.minibatch_size, cfg.ppo.epochs = 4, 2, 2
    services = start_services(cfg, train=False)
    services.worker.ready.wait()
    in_flight, overlaps = threading.Event(), []  # in_flight: a PPO step, from its rollout to its publish
    real_update, real_step, real_zero = ppo.minibatch_update, ppo.PPOTrainer.step, interventions.zero_policy

    def slow_update(models, *args, **kwargs):
        time.sleep(0.15)  # a slow minibatch: the reset will land inside a step
        return real_update(models, *args, **kwargs)

    def watched_step(self, contexts):
        in_flight.set()
        try:
            return real_step(self, contexts)
        finally:
            in_flight.clear()

    def watched_zero(models):
        overlaps.append(in_flight.is_set())
        real_zero(models)

    monkeypatch.setattr(ppo, "minibatch_update", slow_update)
    monkeypatch.setattr(ppo.PPOTrainer, "step", watched_step)
    monkeypatch.setattr(interventions, "zero_policy", watched_zero)
    try:
        collect_votes(services.worker, services.sessions, ["hi", "what is rain?", "name a bird"], concise, 12,
                      cfg, random.Random(0))
        assert run_round(services.worker, services.sessions, cfg.reward, cfg.store.checkpoint_dir) is not None
        services.loop = TrainingLoop(services.worker, services.sessions, cfg).start()
        assert in_flight.wait(60), "PPO never started"
        message = controls.reset_policy(services)  # pressed mid-step
        version = services.worker.serving_version
        models = services.worker.call(0, lambda m: m)
        zero_now = all(b.abs().max() == 0 for b in lora_b(models, "serving"))
        assert in_flight.wait(60)  # training resumed after the reset ...
        deadline = time.time() + 60
        while services.worker.serving_version <= version and time.time() < deadline:
            time.sleep(0.05)
    finally:
        services.stop()
    assert message == f"Policy reset to the base model; now serving v{version}."
    assert overlaps == [False]  # the policy changed only between steps
    assert zero_now  # what people were served right after the reset is the base model
    assert services.worker.serving_version > version  # ... and its next step publishes a newer version


def test_an_admin_adds_and_removes_modes_and_bad_requests_are_refused(services):
    from rlhf_chat.generation.modes import active_modes

    message = controls.add_mode(services, "Riddle", "answer with a riddle", "Here is a riddle:\n\n  \nGuess:", "")
    assert "riddle" in message and "2 opening" in message
    with services.sessions() as s:
        riddle = {m.name: m for m in active_modes(s)}["riddle"]
    assert riddle.openings == ("Here is a riddle:", "Guess:")
    for bad, match in (
        (("", "d", "Hi", ""), "name"), (("two words", "d", "Hi", ""), "name"),
        (("ok", "d", "  \n ", ""), "at least one opening"), (("ok", "d", "x" * 201, ""), "at most 200"),
        (("ok", "d", "Hi", "length"), "Unknown behaviour"),
    ):
        with pytest.raises(ControlError, match=match):
            controls.add_mode(services, *bad)
    assert "ok" not in controls.mode_names(services.sessions)
    assert "removed" in controls.remove_mode(services, "riddle")
    with pytest.raises(ControlError, match="No mode"):
        controls.remove_mode(services, "riddle")
    for name in controls.mode_names(services.sessions)[:-1]:
        message = controls.remove_mode(services, name)
    assert "every pair is plain" in message
    with services.sessions() as s:
        assert len(active_modes(s)) == 1


def test_an_admin_lists_excludes_and_retrains_without_a_contributor(services):
    from rlhf_chat.generation.candidates import Candidate
    from rlhf_chat.storage import store

    def cand(text):
        return Candidate(text, "policy", 0, 0, 0.7, 1.0, 8, 2, True, 0.1)

    for who, n in (("kind-person", 8), ("troll", 6)):
        for i in range(n):
            with services.sessions() as s, s.begin():
                c = store.save_pair(s, session_id=who, context=[{"role": "user", "content": f"{who} asks {i}"}],
                                    a=cand(f"short {i}"), b=cand(f"a much longer answer number {i}"), client=f"hash-{who}")
                store.record_vote(s, c.id, "a" if who == "kind-person" else "b")
    rows = {r[0]: r for r in controls.contributors_table(services)}
    assert rows["session:kind-person"][1] == 8 and rows["client:hash-troll"][1] == 6
    with pytest.raises(ControlError, match="session:KEY"):
        controls.exclude_contributor(services, "troll")
    assert "excluded" in controls.exclude_contributor(services, "session:troll", "votes for the longer one")
    assert "already" in controls.exclude_contributor(services, "session:troll")
    status = controls.CONTRIBUTOR_COLUMNS.index("status")
    assert {r[0]: r for r in controls.contributors_table(services)}["session:troll"][status] == "excluded"
    message = controls.retrain_reward(services)
    assert "Reward model v" in message
    with services.sessions() as s:
        latest = store.reward_rounds(s)[-1]
        assert store.count_votes(s, ("a", "b")) >= 14  # every vote kept
    assert latest.train_pairs + latest.heldout_pairs <= 8  # the troll's six left the round
    assert "trains again" in controls.include_contributor(services, "session:troll")
