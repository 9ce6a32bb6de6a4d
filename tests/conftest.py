"""Shared fixtures: the bundled tokenizer, a tiny random model built from a config,
and app configs pointing at temporary databases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rlhf_chat.config import AppConfig, ModelConfig
from rlhf_chat.model.loading import load_models, prepare_bundled_model, write_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach for a hub
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# `make test` runs two pytest-xdist workers (most of a tiny-model test is Python
# overhead on one core); each gets its share of the cores, so that two workers'
# matrix products never fight over the same two.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // WORKERS))


def pytest_configure(config) -> None:
    """Convert the bundled model once, before any xdist worker starts: two workers
    converting at once would both spend the ~20 s and race to rename the folder."""
    is_controller = not hasattr(config, "workerinput")
    if is_controller and config.pluginmanager.hasplugin("xdist") and config.getoption("numprocesses", None):
        prepare_bundled_model(ModelConfig().cache_dir)


def pytest_collection_modifyitems(items) -> None:
    """Mark every test that loads a model (they all reach ``bundled_path``) as ``model``:
    ``-m "not model"`` is the fast, model-free set the mutation tester runs."""
    for item in items:
        if "bundled_path" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def bundled_path() -> Path:
    """The bundled SmolLM2-135M-Instruct as safetensors (converted once per machine)."""
    return prepare_bundled_model(ModelConfig().cache_dir)


@pytest.fixture(scope="session")
def tiny_path(bundled_path, tmp_path_factory) -> Path:
    """A 10-layer, 64-wide random Llama (LoRA on its top 8, as in production) with the real tokenizer."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"), str(bundled_path))


def make_config(model: str, tmp: Path) -> AppConfig:
    """An app config on a temporary database and checkpoint folder."""
    cfg = AppConfig()
    cfg.model.name = model
    cfg.store.db_url = f"sqlite:///{tmp / 'feedback.db'}"
    cfg.store.checkpoint_dir = str(tmp / "checkpoints")
    return cfg


@pytest.fixture
def tiny_config(tiny_path, tmp_path) -> AppConfig:
    """App config on the tiny model, with short answers and a small tax measure, so tests run in seconds."""
    cfg = make_config(str(tiny_path), tmp_path)
    cfg.sampling.max_new_tokens = 12
    # a simulation's tax measure on 4 factual questions, one answer each, not 40 x 2
    cfg.simulation.tax_fact_questions, cfg.simulation.tax_answers_per_question = 4, 1
    return cfg


@pytest.fixture(scope="session")
def tiny_models(tiny_path):
    """The tiny model loaded the way the app loads a model (4-bit, two copies, adapters)."""
    return load_models(ModelConfig(name=str(tiny_path)))


@pytest.fixture(scope="session")
def tokenizer(tiny_models):
    return tiny_models.tokenizer


@pytest.fixture(scope="session")
def tiny_fp32_models(tiny_path):
    """The tiny model with both copies in float32 (``weights="fp32"``): no layer rounds
    to bf16, so two batch layouts of the same tokens compute the same numbers up to
    float32 rounding on every CPU. On the default path (NF4, bf16 on AVX-512 CPUs) a
    product's last bit may depend on how many rows it multiplies (AMX), and this wide
    random model turns one bf16 ulp into nats a few layers up: tests that compare two
    layouts (padding, batch of 1 against batch of B) compare them here."""
    return load_models(ModelConfig(name=str(tiny_path), weights="fp32"))
