"""Runtime: wiring the store, the model worker and the training loop together.

The app, the command-line tools and the end-to-end tests all start the same
way, through :func:`start_services`.
"""

from __future__ import annotations

import logging

import torch

from rlhf_chat.candidates import Sampling, sample
from rlhf_chat.chat import render_prompt
from rlhf_chat.config import AppConfig
from rlhf_chat.loading import Models, load_models
from rlhf_chat.store import open_store
from rlhf_chat.ui import Services
from rlhf_chat.worker import ModelWorker

log = logging.getLogger(__name__)


def warm_up(models: Models) -> None:
    """Run the serving copy once so that bitsandbytes repacks its CPU weights now,
    not during the first person's request (the first calls are 2x slower)."""
    prompt = render_prompt(models.tokenizer, [{"role": "user", "content": "Hello!"}])
    for _ in range(2):
        sample(models.serving, models.tokenizer, [prompt, prompt], Sampling(max_new_tokens=4, temperature=1.0))


def load_for_serving(cfg: AppConfig) -> Models:
    """Load the models, restore the newest checkpoints, and warm up."""
    torch.set_grad_enabled(True)
    models = load_models(cfg.model)
    warm_up(models)
    return models


def start_services(cfg: AppConfig) -> Services:
    """Open the database and start the model worker (the model loads in the background)."""
    sessions = open_store(cfg.store.db_url, cfg.store.busy_timeout_ms)
    worker = ModelWorker(lambda: load_for_serving(cfg)).start()
    return Services(config=cfg, worker=worker, sessions=sessions)
