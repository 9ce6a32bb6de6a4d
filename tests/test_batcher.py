"""Several people's pairs in one sampling call, each person watching their own two rows."""

from __future__ import annotations

import threading

import pytest

from rlhf_chat.config import SamplingConfig
from rlhf_chat.generation.modes import ModeDraw
from rlhf_chat.generation.worker import CHAT, ModelWorker
from rlhf_chat.serving.batcher import PairBatcher, PairRequest
from rlhf_chat.text.chat import render_prompt


@pytest.fixture
def worker(tiny_models):
    worker = ModelWorker(lambda: tiny_models).start()
    worker.ready.wait()
    yield worker
    worker.stop()


def hold(worker: ModelWorker) -> threading.Event:
    """Keep the worker busy until the returned event is set, as a person's pair or a training slice would."""
    release, started = threading.Event(), threading.Event()
    worker.submit(CHAT, lambda models: (started.set(), release.wait(30)))
    started.wait(30)
    return release


def request_for(text: str, seen: list, **kwargs) -> PairRequest:
    context = [{"role": "user", "content": text}]
    return PairRequest(lambda tok: (context, render_prompt(tok, context)), on_update=seen.append, **kwargs)


SAMPLING = SamplingConfig(max_new_tokens=6, temperature=1.0, stop_loops=False)


def test_people_waiting_together_share_one_call_and_each_sees_only_their_own_rows(worker):
    batcher = PairBatcher(worker, SAMPLING, max_people=8)
    release = hold(worker)
    seen = [[] for _ in range(4)]
    modes = (ModeDraw("follow_up", "Could you tell me"), ModeDraw("direct", ""))
    requests = [
        request_for("hi", seen[0]),
        request_for("what is a cat", seen[1], modes=modes),
        request_for("tell me a joke about owls", seen[2], arena=True),
        request_for("ok", seen[3]),
    ]
    futures = [batcher.submit(r) for r in requests]
    release.set()
    results = [f.result(60) for f in futures]
    assert list(batcher.batch_sizes) == [4]  # one call for the four people
    for k, (context, a, b) in enumerate(results):
        assert context == [{"role": "user", "content": ["hi", "what is a cat", "tell me a joke about owls", "ok"][k]}]
        assert seen[k] and [t.strip() for t in seen[k][-1]] == [a.text, b.text]  # the last update is their final pair
        assert all(len(update) == 2 for update in seen[k])
    _, a, b = results[1]
    assert a.text.startswith("Could you tell me") and (a.mode, b.mode) == ("follow_up", "direct")
    assert not any(c.text.startswith("Could you tell me") for _, *pair in results[:1] + results[2:] for c in pair)
    _, a, b = results[2]
    assert {a.source, b.source} == {"policy", "reference"}  # the arena pair in the same call
    assert all(c.source == "policy" for k in (0, 1, 3) for c in results[k][1:])
    assert len({c.seed for _, *pair in results for c in pair}) == 1  # one call, one recorded seed


def test_a_batch_takes_at_most_max_people_and_the_rest_go_right_behind(worker):
    batcher = PairBatcher(worker, SAMPLING, max_people=2)
    release = hold(worker)
    futures = [batcher.submit(request_for(f"q{k}", [])) for k in range(5)]
    release.set()
    assert all(f.result(60)[1].text is not None for f in futures)
    assert list(batcher.batch_sizes) == [2, 2, 1]
    assert batcher.waiting() == 0
    # a later person, alone, is not left waiting for company
    assert batcher.submit(request_for("later", [])).result(60)
    assert list(batcher.batch_sizes) == [2, 2, 1, 1]


def test_a_cancelled_request_costs_no_decoding_and_a_failure_reaches_everyone_in_its_batch(worker):
    batcher = PairBatcher(worker, SAMPLING, max_people=8)
    release = hold(worker)
    gone = batcher.submit(request_for("browser closed", []))
    kept = batcher.submit(request_for("still here", []))
    assert gone.cancel()
    release.set()
    assert kept.result(60)[0][0]["content"] == "still here"
    assert list(batcher.batch_sizes) == [1] and gone.cancelled()

    def broken(tok):
        raise RuntimeError("no prompt")

    release = hold(worker)
    bad = batcher.submit(PairRequest(broken))
    neighbour = batcher.submit(request_for("next to a broken one", []))
    release.set()
    with pytest.raises(RuntimeError, match="no prompt"):
        bad.result(60)
    assert neighbour.result(60)[0][0]["content"] == "next to a broken one"  # only the broken one failed
    # a failure of the call itself reaches everyone in it, and the worker goes on
    release = hold(worker)
    too_big = [batcher.submit(PairRequest(lambda tok: ([], [10**9]))) for _ in range(2)]  # no such token
    release.set()
    for future in too_big:
        with pytest.raises(Exception):
            future.result(60)
    assert batcher.submit(request_for("after the failure", [])).result(60)
    with pytest.raises(ValueError, match="batch_people"):
        PairBatcher(worker, SAMPLING, max_people=0)


def test_people_arriving_moments_apart_on_an_idle_model_share_one_call(worker):
    """Each arrival extends the wait (ui.batch_wait_s after the newest): four people
    30 ms apart go in one call; with no wait the first goes alone."""
    import time

    for wait_s, expected in ((0.1, [4]), (0.0, None)):
        batcher = PairBatcher(worker, SAMPLING, max_people=8, wait_s=wait_s)
        futures = []
        for k in range(4):
            futures.append(batcher.submit(request_for(f"q{k}", [])))
            time.sleep(0.03)
        assert all(f.result(60) for f in futures)
        if expected is not None:
            assert list(batcher.batch_sizes) == expected
        else:
            assert batcher.batch_sizes[0] == 1 and len(batcher.batch_sizes) > 1


def test_a_model_that_failed_to_load_fails_the_request_instead_of_leaving_it_waiting():
    def broken():
        raise OSError("no weights here")

    worker = ModelWorker(broken).start()
    worker.ready.wait(30)
    batcher = PairBatcher(worker, SAMPLING)
    with pytest.raises(RuntimeError, match="no weights here"):
        batcher.submit(request_for("anyone?", [])).result(30)
    with pytest.raises(RuntimeError, match="no weights here"):  # and the next one too
        batcher.submit(request_for("still?", [])).result(30)
    worker.stop()
