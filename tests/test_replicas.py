"""Serving replicas and one trainer on the tiny model: a serve replica has no
training copy, follows each published policy, refuses a partial or corrupt one
and keeps serving what it has; /health says what a load balancer needs; the
trainer's role takes the lease first."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from rlhf_chat.config import AppConfig
from rlhf_chat.learning.checkpoints import WEIGHTS, files_digest
from rlhf_chat.learning.ppo import PPOTrainer
from rlhf_chat.model.loading import POLICY, adapter_state, sync_policy_weights
from rlhf_chat.runtime import start_services
from rlhf_chat.serving import controls, dashboard
from rlhf_chat.serving.health import health, serve_health
from rlhf_chat.storage import lease, store
from rlhf_chat.storage.lease import LeaseHeld


def config(tiny_path, tmp, role: str) -> AppConfig:
    cfg = AppConfig()
    cfg.model.name = str(tiny_path)
    cfg.store.db_url = f"sqlite:///{tmp / 'feedback.db'}"  # one database, one checkpoint folder for all roles
    cfg.store.checkpoint_dir = str(tmp / "checkpoints")
    cfg.deploy.role = role
    cfg.deploy.follow_every_s = 0.2
    return cfg


@pytest.fixture(scope="module")
def deployment(tiny_path, tmp_path_factory):
    """A process that can publish (role all, no loop: the test drives it) and a serve replica."""
    tmp = tmp_path_factory.mktemp("replicas")
    publisher = start_services(config(tiny_path, tmp, "all"), train=False)
    assert publisher.worker.ready.wait(120)  # one load at a time: transformers' loading is not thread-safe
    replica = start_services(config(tiny_path, tmp, "serve"))
    assert replica.worker.ready.wait(120)
    yield publisher, replica
    replica.stop()
    publisher.stop()


def publish(services, seed: int) -> int:
    """Give the policy new weights and publish them as the trainer does (PPOTrainer.save)."""

    def change(models) -> int:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in adapter_state(models.trainer, POLICY).items():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        sync_policy_weights(models.trainer, models.serving)
        models.serving_version += 1
        return models.serving_version

    version = services.worker.call(0, change)
    cfg = services.config
    PPOTrainer(services.worker, services.sessions, cfg.ppo, cfg.store.checkpoint_dir, sampling=cfg.sampling).save(version)
    return version


def serving_lora(services) -> dict[str, torch.Tensor]:
    return services.worker.call(0, lambda m: {k: v.detach().clone() for k, v in adapter_state(m.serving, POLICY).items()})


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_a_serve_replica_has_no_training_copy_and_refuses_training_controls(deployment):
    _, replica = deployment
    assert replica.worker.call(0, lambda m: (m.trainer, m.value_head, m.reward_head)) == (None, None, None)
    assert replica.loop is None
    for control in (controls.pause, controls.reset_policy):
        with pytest.raises(controls.ControlError, match="only serves"):
            control(replica)
    with pytest.raises(controls.ControlError, match="only serves"):
        controls.rollback(replica, 1)


def test_a_published_policy_reaches_the_replica_whole_and_is_what_it_serves(deployment):
    publisher, replica = deployment
    version = publish(publisher, seed=1)
    with publisher.sessions() as session:
        row = store.latest_checkpoint(session, "policy")
    assert row.version == version and row.extra["sha256"] == files_digest(row.path)
    assert wait_for(lambda: replica.worker.serving_version == version)
    theirs, ours = serving_lora(publisher), serving_lora(replica)
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert any(ours[k].abs().sum() > 0 for k in ours if "lora_B" in k)  # not the zero adapter it started with
    code, body = health(replica)
    assert code == 200
    assert (body["role"], body["policy_version"], body["published_policy_version"]) == ("serve", version, version)


def test_a_partial_or_missing_checkpoint_is_refused_and_the_replica_keeps_serving(deployment):
    publisher, replica = deployment
    good = publish(publisher, seed=2)
    assert wait_for(lambda: replica.worker.serving_version == good)
    before = serving_lora(replica)

    bad = publish(publisher, seed=3)
    with publisher.sessions() as session:
        path = store.latest_checkpoint(session, "policy").path
    weights = Path(path) / WEIGHTS
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # a copy still under way
    assert wait_for(lambda: replica.follower.status.problem != "")
    assert f"policy v{bad} was published but its files are partial" in replica.follower.status.problem
    assert replica.worker.serving_version == good
    assert all(torch.equal(before[k], v) for k, v in serving_lora(replica).items())
    shown = dashboard.loop_state(None, replica.follower)
    assert "Policy update held back" in shown and f"keeps serving v{good}" in shown and path not in shown
    assert health(replica)[1]["follow_problem"].startswith(f"policy v{bad}")

    moved = Path(path).with_name("gone")
    shutil.move(path, moved)  # a volume that lost the folder
    assert wait_for(lambda: "missing" in replica.follower.status.problem)
    assert replica.worker.serving_version == good

    shutil.move(moved, path)
    with publisher.sessions() as session:
        good_path = next(c.path for c in store.checkpoints(session, "policy") if c.version == good)
    shutil.copy(Path(good_path) / WEIGHTS, weights)  # whole, readable, and not what was published
    assert wait_for(lambda: "corrupt" in replica.follower.status.problem)
    assert replica.worker.serving_version == good
    restarted = start_services(replica.config)  # a replica starting now serves the newest whole checkpoint
    try:
        assert restarted.worker.ready.wait(120) and restarted.worker.serving_version == good
    finally:
        restarted.stop()

    weights.write_bytes(whole)  # the files arrive whole: the next look loads them
    # the worker serves the new version a moment before the follower clears its note: wait for both
    assert wait_for(lambda: replica.worker.serving_version == bad and replica.follower.status.problem == "")


def test_the_training_tab_says_when_the_trainer_is_offline_and_votes_are_kept(deployment):
    _, replica = deployment
    me = lease.Holder("trainer-host", 4242, "t")
    lease.take(replica.sessions, me, 30.0)
    assert wait_for(lambda: replica.follower.trainer_online())
    assert "on the trainer (trainer-host" in dashboard.loop_state(None, replica.follower)
    assert health(replica)[1]["trainer_host"] == "trainer-host"
    with replica.sessions() as session, session.begin():  # as if its heartbeat were 60 s old
        lease.current(session).heartbeat_at = time.time() - 60
    assert wait_for(lambda: not replica.follower.trainer_online())
    text = dashboard.loop_state(None, replica.follower)
    assert "trainer is offline" in text and "Votes are still stored" in text
    assert health(replica)[1]["trainer_heartbeat_age_s"] >= 59
    lease.release(replica.sessions, me)


def test_health_over_http_from_the_ui_and_from_the_trainers_server(deployment):
    from rlhf_chat.serving.ui import build_demo, launch_options

    publisher, replica = deployment
    demo = build_demo(replica)
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, **launch_options(replica.config, replica))
    try:
        with urllib.request.urlopen(f"{demo.local_url.rstrip('/')}/health", timeout=10) as response:
            body = json.loads(response.read())
            assert response.status == 200
    finally:
        demo.close()
    expected = {"status", "role", "policy_version", "published_policy_version", "reward_version", "votes", "queue",
                "trainer_host", "trainer_heartbeat_age_s", "training", "follow_problem"}
    assert expected <= body.keys() and body["role"] == "serve" and body["status"] == "ok"

    server = serve_health(publisher, "127.0.0.1", 0)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert json.loads(response.read())["role"] == "all"
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    finally:
        server.shutdown()


def test_the_train_role_takes_the_lease_before_loading_and_gives_it_back(tiny_path, tmp_path):
    cfg = config(tiny_path, tmp_path, "train")
    trainer = start_services(cfg)
    try:
        with trainer.sessions() as session:
            held = lease.current(session)
        assert held is not None and trainer.lease_keeper is not None and trainer.loop is not None
        started = time.monotonic()
        with pytest.raises(LeaseHeld, match="another trainer holds"):
            start_services(cfg)
        assert time.monotonic() - started < 5  # refused before any model loads
    finally:
        trainer.stop()
    with trainer.sessions() as session:
        assert lease.current(session) is None  # a clean stop: the next trainer starts at once
    start_services(cfg).stop()


def test_a_lost_lease_halts_training_and_says_why(tiny_path, tmp_path):
    cfg = config(tiny_path, tmp_path, "train")
    cfg.deploy.heartbeat_s, cfg.deploy.lease_ttl_s = 0.1, 1.0
    trainer = start_services(cfg)
    try:
        assert trainer.worker.ready.wait(120)
        lease.take(trainer.sessions, lease.Holder("other", 1, "x"), 1.0, now=time.time() + 5)
        assert wait_for(lambda: trainer.loop.status.state == "error" and "lost the trainer lease" in trainer.loop.status.last_error)
        assert "held by other" in trainer.loop.status.last_error
    finally:
        trainer.stop()
    with trainer.sessions() as session:
        assert lease.current(session).host == "other"  # stopping did not release another's lease


def test_the_role_comes_from_the_flag_or_the_environment_and_a_bad_one_is_refused():
    import app
    from rlhf_chat.config import config_from_args

    assert config_from_args(app.parse_args([]), {}).deploy.role == "all"
    assert config_from_args(app.parse_args([]), {"RLHF_CHAT_ROLE": "serve"}).deploy.role == "serve"
    assert config_from_args(app.parse_args(["--role", "train"]), {"RLHF_CHAT_ROLE": "serve"}).deploy.role == "train"
    with pytest.raises(ValueError, match="role 'trian': expected one of all, serve, train"):
        config_from_args(app.parse_args([]), {"RLHF_CHAT_ROLE": "trian"})
    with pytest.raises(ValueError, match="must exceed twice"):
        config_from_args(app.parse_args(["--set", "deploy.lease_ttl_s=8"]), {})
