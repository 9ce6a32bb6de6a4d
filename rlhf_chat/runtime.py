"""Runtime: wiring the store, the model worker and the training loop together.

The app, the command-line tools and the end-to-end tests all start the same
way, through :func:`start_services`.
"""

from __future__ import annotations

import logging

import torch

from rlhf_chat.config import AppConfig, validate
from rlhf_chat.generation.candidates import Sampling, sample
from rlhf_chat.generation.worker import ModelWorker
from rlhf_chat.learning.checkpoints import restore_latest
from rlhf_chat.learning.ppo import load_policy
from rlhf_chat.learning.reward import load_reward
from rlhf_chat.learning.training_loop import TrainingLoop
from rlhf_chat.model.loading import Models, load_models
from rlhf_chat.serving.follower import PolicyFollower
from rlhf_chat.serving.services import Services
from rlhf_chat.storage import lease
from rlhf_chat.storage.store import open_store
from rlhf_chat.text.chat import render_prompt

log = logging.getLogger(__name__)


def warm_up(models: Models) -> None:
    """Run the serving copy once so that bitsandbytes repacks its CPU weights now,
    not during the first person's request (the first calls are 2x slower)."""
    prompt = render_prompt(models.tokenizer, [{"role": "user", "content": "Hello!"}])
    for _ in range(2):
        sample(models.serving, models.tokenizer, [prompt, prompt], Sampling(max_new_tokens=4, temperature=1.0))


def load_for_serving(cfg: AppConfig, sessions=None, training: bool = True) -> Models:
    """Load the models, restore the newest checkpoints, and warm up. A serve
    replica (``training`` False) loads the serving copy and the policy only."""
    torch.set_grad_enabled(True)
    models = load_models(cfg.model, training=training)
    if sessions is not None:
        if training:
            restore_latest(models, sessions, "reward", load_reward)
        restore_latest(models, sessions, "policy", load_policy)
    warm_up(models)
    return models


def start_services(cfg: AppConfig, train: bool = True) -> Services:
    """Open the database and start what this process's role (``deploy.role``) runs.

    * ``all``: the model worker (the model loads in the background) and, unless
      ``train`` is False (tests, benchmarks), the training loop;
    * ``serve``: the worker with the serving copy only, and a follower that
      loads each policy the trainer publishes;
    * ``train``: first the trainer lease (:class:`lease.LeaseHeld` if another
      trainer holds it), then the worker and the training loop, the lease
      renewed in the background.
    """
    validate(cfg)  # the same refusals as the command line, for callers that build a config in code
    role = cfg.deploy.role
    sessions = open_store(cfg.store.db_url, cfg.store.busy_timeout_ms)
    me = None
    if role == "train":
        me = lease.Holder.this_process()
        lease.take(sessions, me, cfg.deploy.lease_ttl_s)
    training = role != "serve"
    worker = ModelWorker(
        lambda: load_for_serving(cfg, sessions, training), cfg.model.trim_memory_every_s, cfg.model.training_share
    ).start()
    loop = TrainingLoop(worker, sessions, cfg) if training and (train or role == "train") else None
    follower = PolicyFollower(worker, sessions, cfg.deploy).start() if role == "serve" else None
    keeper = None
    if me is not None:
        keeper = lease.LeaseKeeper(sessions, me, cfg.deploy.heartbeat_s, on_lost=lambda why: loop.halt(why)).start()
    services = Services(config=cfg, worker=worker, sessions=sessions, loop=loop, follower=follower, lease_keeper=keeper)
    if loop is not None:
        loop.on_trip = lambda version: roll_back_after_trip(services, version)
        loop.start()
    return services


def roll_back_after_trip(services: Services, version: int) -> str:
    """What the tripwire does to the policy being served: the admin's own rollback to
    ``version`` (a new version, checkpointed), or a reset to the starting model for 0."""
    from rlhf_chat.serving import controls

    return controls.rollback(services, version) if version > 0 else controls.reset_policy(services)
