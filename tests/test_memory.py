"""What a Space that runs for days holds in memory, each bound by a setting (issue 42):
the native per-shape kernel caches, freed heap memory given back, Gradio's per-session
state and the admission windows of people who left. (The prefix cache's bound:
test_reward.py; checkpoints on disk: test_training_loop.py.)"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch

from rlhf_chat.config import AppConfig, ModelConfig
from rlhf_chat.generation.worker import ModelWorker
from rlhf_chat.model import loading, memory
from rlhf_chat.serving.admission import SlidingWindow
from rlhf_chat.serving.ui import launch_options


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_shape_caches_are_capped_unless_the_operator_set_them():
    env: dict[str, str] = {}
    assert memory.limit_shape_caches(64, env) == {name: "64" for name in memory.SHAPE_CACHE_VARIABLES}
    env = {"LRU_CACHE_CAPACITY": "8"}  # the operator's own value wins
    assert memory.limit_shape_caches(64, env) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "8"}
    assert memory.limit_shape_caches(0, {}) == {}  # 0: the libraries' defaults


def test_the_model_loader_caps_the_shape_caches_before_anything_else(monkeypatch):
    """The caches read their capacity at the first product, so the cap comes first in load_models."""
    seen = []

    class Stop(Exception):
        pass

    def record(capacity, environ=None):
        seen.append(capacity)
        raise Stop

    monkeypatch.setattr(loading, "limit_shape_caches", record)
    monkeypatch.setattr(loading, "pick_device", lambda: pytest.fail("the device was picked before the cap"))
    with pytest.raises(Stop):
        loading.load_models(ModelConfig(shape_cache_capacity=17))
    assert seen == [17]


def test_the_trimmer_trims_at_most_once_per_interval():
    clock, calls = Clock(), []
    trimmer = memory.MemoryTrimmer(30.0, release=lambda: calls.append(clock.now) or True, clock=clock)
    for now in (1, 29, 31, 40, 60, 62):
        clock.now = now
        trimmer.maybe_trim()
    assert calls == [31, 62] and trimmer.trims == 2
    never = memory.MemoryTrimmer(0.0, release=lambda: pytest.fail("trimmed with the setting at 0"), clock=clock)
    clock.now = 1e9
    assert never.maybe_trim() is False


def test_the_model_worker_trims_between_jobs():
    worker = ModelWorker(lambda: SimpleNamespace(serving_version=0), trim_every_s=1e-6).start()
    trims = []
    worker.trimmer.release = lambda: trims.append(threading.current_thread().name) or True
    try:
        for _ in range(3):
            worker.call(0, lambda m: time.sleep(0.01), timeout=30)
        deadline = time.monotonic() + 5
        while not trims and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        worker.stop()
    assert trims and set(trims) == {"model-worker"}  # on the thread that allocates the tensors
    assert ModelWorker(lambda: None).trimmer.every_s == ModelConfig().trim_memory_every_s


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.skipif(memory._malloc_trim() is None, reason="no glibc malloc_trim here")
def test_freed_memory_goes_back_to_the_system():
    """The pattern of decoding calls: big key/value caches freed while small long-lived
    tensors (prefix-cache entries) are kept between them. glibc keeps most of the freed
    memory resident; a trim gives it back."""
    kept, start = [], resident_mb()
    for call in range(12):
        cache = [torch.zeros(12, 3, 700, 64) for _ in range(30)]  # 6.5 MB each: served from the heap
        for shrink in range(3):
            kept.append(torch.zeros(200 + call, 576))  # small, kept
            cache = [c[: 10 - 3 * shrink].clone() for c in cache]
        del cache
    grown = resident_mb() - start
    assert memory.release_freed_memory()
    given_back = start + grown - resident_mb()
    print(f"kept {sum(t.numel() for t in kept) * 4 / 2**20:.0f} MB; resident grew {grown:.0f} MB; trim gave back "
          f"{given_back:.0f} MB")
    assert given_back >= 0.5 * grown or grown < 50  # (a heap already fragmented may grow less)


def test_gradio_keeps_at_most_max_sessions_states():
    """The state of people who left is bounded: Gradio drops the least recently used sessions
    beyond ``ui.max_sessions`` (launch_options passes it on as state_session_capacity)."""
    cfg = AppConfig()
    cfg.ui.max_sessions = 5
    options = launch_options(cfg)
    assert options["state_session_capacity"] == 5
    with gr.Blocks() as demo:
        gr.State(None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **options)
    try:
        for k in range(20):
            demo.state_holder[f"session-{k}"]  # each person's first event makes a session's state
        assert len(demo.state_holder.session_data) == 5
        assert "session-19" in demo.state_holder and "session-0" not in demo.state_holder
    finally:
        demo.close()
    assert AppConfig().ui.max_sessions < 10_000  # below Gradio's own default, which is about 950 MB here


def test_admission_windows_forget_people_who_left():
    clock = Clock()
    window = SlidingWindow(window_s=60.0, clock=clock)
    for k in range(1000):
        window.admit({f"session:{k}": 8})
    assert len(window._events) == 1000
    clock.now = 61.0  # a minute later, only one person is still there
    window.admit({"session:still-here": 8})
    assert set(window._events) == {"session:still-here"}


MALLINFO_PROBE = """
import ctypes, ctypes.util, sys
import torch
from rlhf_chat.model.memory import fix_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
fixed = fix_mmap_threshold(int(sys.argv[1]))
big = torch.empty(16 * 2**20, dtype=torch.uint8)
del big  # glibc's sliding threshold now climbs to 16 MB
before = libc.mallinfo2().hblks
block = torch.empty(4 * 2**20, dtype=torch.uint8)
print(fixed, libc.mallinfo2().hblks - before)
"""


def test_a_fixed_mmap_threshold_gives_large_blocks_their_own_mapping(tmp_path):
    """After a 16 MB block is freed, glibc's sliding threshold serves a 4 MB tensor
    from its heaps; with model.mmap_threshold_bytes at 1 MiB it gets a mapping of
    its own (counted by glibc's mallinfo2), which goes back to the system when freed.
    A separate process: the setting is the whole process's allocator."""
    import ctypes.util
    import subprocess
    import sys

    if not ctypes.util.find_library("c") or not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"):
        pytest.skip("needs glibc 2.33 or later (mallinfo2)")
    root = Path(__file__).resolve().parents[1]

    def probe(threshold: int) -> str:
        done = subprocess.run([sys.executable, "-c", MALLINFO_PROBE, str(threshold)], cwd=root, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert probe(0) == ["False", "0"]  # the sliding threshold: from the heap
    assert probe(2**20) == ["True", "1"]


def test_the_model_loader_fixes_the_mmap_threshold(monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    monkeypatch.setattr(loading, "fix_mmap_threshold", lambda n: seen.append(n))
    monkeypatch.setattr(loading, "pick_device", lambda: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        loading.load_models(ModelConfig(mmap_threshold_bytes=12345))
    assert seen == [12345]


def test_mmap_threshold_zero_leaves_the_allocator_alone():
    assert memory.fix_mmap_threshold(0, mallopt=lambda *a: pytest.fail("mallopt called at 0")) is False
    calls = []
    assert memory.fix_mmap_threshold(4096, mallopt=lambda p, v: calls.append((p, v)) or 1) is True
    assert calls == [(memory.M_MMAP_THRESHOLD, 4096)]
