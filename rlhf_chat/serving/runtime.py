"""Runtime: wiring the store, the model worker and the training loop together.

The app, the command-line tools and the end-to-end tests all start the same
way, through :func:`start_services`.
"""

from __future__ import annotations

import logging

import torch

from rlhf_chat.config import AppConfig, validate
from rlhf_chat.learning.ppo import load_policy
from rlhf_chat.learning.reward import load_reward
from rlhf_chat.learning.training_loop import TrainingLoop
from rlhf_chat.model.loading import Models, load_models
from rlhf_chat.serving.candidates import Sampling, sample
from rlhf_chat.serving.chat import render_prompt
from rlhf_chat.serving.ui import Services
from rlhf_chat.serving.worker import ModelWorker
from rlhf_chat.storage import store
from rlhf_chat.storage.store import open_store

log = logging.getLogger(__name__)


def warm_up(models: Models) -> None:
    """Run the serving copy once so that bitsandbytes repacks its CPU weights now,
    not during the first person's request (the first calls are 2x slower)."""
    prompt = render_prompt(models.tokenizer, [{"role": "user", "content": "Hello!"}])
    for _ in range(2):
        sample(models.serving, models.tokenizer, [prompt, prompt], Sampling(max_new_tokens=4, temperature=1.0))


def restore_latest(models: Models, sessions, kind: str, load) -> int:
    """Load the newest checkpoint of a kind that is still on disk; 0 when there is none.

    An older one is tried when the newest is unreadable (a wiped disk, a
    half-copied volume), so a restart never serves less than it can.
    """
    with sessions() as session:
        saved = list(reversed(store.checkpoints(session, kind)))
    for checkpoint in saved:
        try:
            version = load(models, checkpoint.path)
            log.info("restored %s checkpoint v%d from %s", kind, version, checkpoint.path)
            return version
        except (OSError, KeyError, ValueError) as exc:
            log.warning("cannot load %s checkpoint %s: %s", kind, checkpoint.path, exc)
    return 0


def load_for_serving(cfg: AppConfig, sessions=None) -> Models:
    """Load the models, restore the newest checkpoints, and warm up."""
    torch.set_grad_enabled(True)
    models = load_models(cfg.model)
    if sessions is not None:
        restore_latest(models, sessions, "reward", load_reward)
        restore_latest(models, sessions, "policy", load_policy)
    warm_up(models)
    return models


def start_services(cfg: AppConfig, train: bool = True) -> Services:
    """Open the database, start the model worker (the model loads in the background)
    and, unless ``train`` is False, the training loop."""
    validate(cfg)  # the same refusals as the command line, for callers that build a config in code
    sessions = open_store(cfg.store.db_url, cfg.store.busy_timeout_ms)
    worker = ModelWorker(lambda: load_for_serving(cfg, sessions)).start()
    loop = TrainingLoop(worker, sessions, cfg).start() if train else None
    return Services(config=cfg, worker=worker, sessions=sessions, loop=loop)
