"""deploy/batcher.py: every answer goes back to its own caller (threads and asyncio, the Python API and the
server), a lone item runs at once, a queue is served oldest first in batches of at most max_batch, and an
exception reaches only the callers it belongs to; the same for LoopBatcher, which batches on the event loop.

No timing assertions: "at once" is checked with a max_wait of a minute and a result() timeout of seconds,
and fairness by order (no item is overtaken) and by counting the batches an item waits for."""

from __future__ import annotations

import asyncio
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from mnistlab.deploy.batcher import Ask, Batcher, BatcherClosed, LoopBatcher, prediction_batcher
from mnistlab.deploy.predict import Predictor
from mnistlab.deploy.preprocess import Prepared

pytestmark = pytest.mark.usefixtures("one_thread")
MINUTE = 60_000.0  # max_wait_ms no test may sit through: a result() timeout of seconds catches it


class Gated:
    """A batch function that doubles numbers, records each batch, raises for negative numbers, and holds every
    call while `gate` is clear (so the test decides when the worker is busy)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[list[int]] = []
        self.entered = threading.Semaphore(0)

    def __call__(self, items: list[int]) -> list[int]:
        self.entered.release()
        assert self.gate.wait(timeout=10)
        self.batches.append(list(items))
        if any(x < 0 for x in items):
            raise ValueError(f"negative: {[x for x in items if x < 0]}")
        return [2 * x for x in items]


def hold_worker(fn: Gated, batcher: Batcher) -> object:
    """Make the worker busy with item 0 (held at the gate); return its future."""
    fn.gate.clear()
    first = batcher.submit(0)
    assert fn.entered.acquire(timeout=5)
    return first


def test_a_lone_item_runs_at_once_though_max_wait_is_a_minute():
    fn = Gated()
    with Batcher(fn, max_batch=8, max_wait_ms=MINUTE) as batcher:
        for x in range(5):  # one at a time: each finds the worker idle
            assert batcher.submit(x).result(timeout=5) == 2 * x
        assert batcher.sizes == [1] * 5


def test_items_queued_while_busy_join_one_batch_and_it_runs_once_full():
    fn = Gated()
    with Batcher(fn, max_batch=4, max_wait_ms=MINUTE) as batcher:
        first = hold_worker(fn, batcher)
        queued = [batcher.submit(x) for x in (1, 2, 3)]
        fn.gate.set()
        assert first.result(timeout=5) == 0
        # three queued, max_batch 4: the worker waits (up to a minute) for a fourth; it comes, the batch runs
        fourth = batcher.submit(4)
        assert [f.result(timeout=5) for f in [*queued, fourth]] == [2, 4, 6, 8]
        assert fn.batches == [[0], [1, 2, 3, 4]]


def test_a_queued_item_waits_no_longer_than_max_wait_for_company():
    fn = Gated()
    with Batcher(fn, max_batch=64, max_wait_ms=0) as batcher:
        first = hold_worker(fn, batcher)
        queued = [batcher.submit(x) for x in (1, 2)]
        fn.gate.set()
        assert [f.result(timeout=5) for f in (first, *queued)] == [0, 2, 4]  # no fourth needed
        assert fn.batches == [[0], [1, 2]]


def test_batch_size_bound_is_respected():
    fn = Gated()
    with Batcher(fn, max_batch=5, max_wait_ms=0) as batcher:
        first = hold_worker(fn, batcher)
        futures = [batcher.submit(x) for x in range(1, 23)]
        fn.gate.set()
        assert first.result(timeout=5) == 0
        assert [f.result(timeout=5) for f in futures] == [2 * x for x in range(1, 23)]
    assert [len(b) for b in fn.batches] == [1, 5, 5, 5, 5, 2]
    assert batcher.sizes == [1, 5, 5, 5, 5, 2]


def test_a_steady_stream_is_served_oldest_first_and_nobody_waits_more_than_the_queue_ahead():
    """Four producers keep the queue full; every item is answered within the batches needed to clear what was
    queued ahead of it when it arrived (plus the one running), and no item is ever overtaken."""
    done_batches = [0]

    def slow(items: list[int]) -> list[int]:
        threading.Event().wait(0.002)  # long enough for the producers to queue more behind it
        done_batches[0] += 1
        return items

    max_batch = 4
    waited: list[tuple[int, int, int]] = []  # (batches done at submission, batches done when answered, ahead)
    order: list[int] = []
    counts = {"submitted": 0, "answered": 0}
    lock = threading.Lock()

    def answered(future, before: int, ahead: int) -> None:
        with lock:
            counts["answered"] += 1
            waited.append((before, done_batches[0], ahead))

    with Batcher(slow, max_batch=max_batch, max_wait_ms=1) as batcher:
        def producer(k: int) -> None:
            for i in range(50):
                with lock:  # items submitted and not yet answered: at most this many are ahead of this one
                    ahead, before = counts["submitted"] - counts["answered"], done_batches[0]
                    counts["submitted"] += 1
                    future = batcher.submit(k * 1000 + i)
                future.add_done_callback(lambda f, b=before, a=ahead: answered(f, b, a))
                order.append(future.result(timeout=10))  # a producer waits for its item: a steady stream

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert len(waited) == 200 and sorted(order) == sorted(k * 1000 + i for k in range(4) for i in range(50))
    for before, after, ahead in waited:
        assert after - before <= 1 + -(-(ahead + 1) // max_batch), (before, after, ahead)
    assert max(batcher.sizes) <= max_batch and sum(batcher.sizes) == 200


def test_fifo_no_item_is_overtaken():
    fn = Gated()
    with Batcher(fn, max_batch=3, max_wait_ms=0) as batcher:
        first = hold_worker(fn, batcher)
        futures = [batcher.submit(x) for x in range(1, 11)]
        fn.gate.set()
        first.result(timeout=5)
        [f.result(timeout=5) for f in futures]
    assert [x for batch in fn.batches for x in batch] == list(range(11))


def test_an_exception_reaches_only_the_item_that_raised_it():
    fn = Gated()
    with Batcher(fn, max_batch=8, max_wait_ms=0) as batcher:
        first = hold_worker(fn, batcher)
        futures = {x: batcher.submit(x) for x in (1, -2, 3, -4, 5)}
        fn.gate.set()
        first.result(timeout=5)
        for x, future in futures.items():
            if x < 0:
                with pytest.raises(ValueError, match=f"negative: \\[{x}\\]"):
                    future.result(timeout=5)
            else:
                assert future.result(timeout=5) == 2 * x
    assert fn.batches[1] == [1, -2, 3, -4, 5]  # one batch first; it failed, so each item ran alone


def test_a_failing_batch_fails_each_of_its_callers_and_the_worker_goes_on():
    def broken(items: list[int]) -> list[int]:
        if 99 in items:
            raise MemoryError("out of memory")
        return items[:-1] if 7 in items else items  # 7: one answer short

    with Batcher(broken, max_batch=4, max_wait_ms=0) as batcher:
        with pytest.raises(MemoryError):
            batcher.submit(99).result(timeout=5)
        with pytest.raises(RuntimeError, match="0 answers for 1 items"):
            batcher(7)
        assert batcher(5) == 5  # the worker thread survived both


def test_a_cancelled_item_is_skipped_and_close_answers_the_queue_then_refuses():
    fn = Gated()
    batcher = Batcher(fn, max_batch=8, max_wait_ms=0)
    first = hold_worker(fn, batcher)
    cancelled, kept = batcher.submit(1), batcher.submit(2)
    assert cancelled.cancel()
    fn.gate.set()
    batcher.close()
    assert first.result(timeout=5) == 0 and kept.result(timeout=5) == 4
    assert fn.batches == [[0], [2]]
    with pytest.raises(BatcherClosed):
        batcher.submit(3)


def test_bad_settings_are_refused():
    for kwargs in (dict(max_batch=0), dict(workers=0), dict(max_wait_ms=-1)):
        with pytest.raises(ValueError):
            Batcher(lambda items: items, **kwargs)


def test_many_threads_and_many_tasks_each_get_their_own_answer():
    def square(items: list[int]) -> list[int]:
        threading.Event().wait(0.001)
        return [x * x for x in items]

    with Batcher(square, max_batch=16, max_wait_ms=1, workers=2) as batcher:
        with ThreadPoolExecutor(16) as pool:
            assert list(pool.map(batcher, range(400))) == [x * x for x in range(400)]

        async def many() -> list[int]:
            return await asyncio.gather(*(batcher.run(x) for x in range(400)))

        assert asyncio.run(many()) == [x * x for x in range(400)]
        assert max(batcher.sizes) > 1  # they did share batches


# --- LoopBatcher: the same on the event loop's thread --------------------------------------------------------

class Recorded:
    """Doubles numbers, records each batch and the thread it ran on, raises for negative numbers."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if any(x < 0 for x in items):
            raise ValueError(f"negative: {[x for x in items if x < 0]}")
        return [2 * x for x in items]


def test_loop_batcher_answers_a_lone_item_in_the_next_turn():
    fn = Recorded()
    batcher = LoopBatcher(fn, max_batch=32)

    async def lone() -> int:
        return await asyncio.wait_for(batcher.run(21), timeout=5)

    assert asyncio.run(lone()) == 42 and fn.batches == [[21]]
    assert fn.threads == {threading.current_thread().name}  # on the loop's own thread: no hand-over


def test_loop_batcher_joins_the_items_of_one_turn_oldest_first_in_bounded_calls():
    fn = Recorded()
    batcher = LoopBatcher(fn, max_batch=4)

    async def burst() -> list[int]:
        return await asyncio.gather(*(batcher.run(x) for x in range(10)))

    assert asyncio.run(burst()) == [2 * x for x in range(10)]
    assert fn.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and batcher.sizes == [4, 4, 2]


def test_loop_batcher_items_that_arrive_while_a_call_runs_join_the_next_one():
    batches: list[list[int]] = []
    late: list[asyncio.Future] = []

    def fn(items: list[int]) -> list[int]:
        batches.append(list(items))
        if items == [0]:  # three requests arrive while the first call runs: the loop takes them up after it
            late.extend(asyncio.ensure_future(batcher.run(x)) for x in (1, 2, 3))
        return items

    async def scenario() -> None:
        assert await batcher.run(0) == 0
        assert await asyncio.gather(*late) == [1, 2, 3]

    batcher = LoopBatcher(fn, max_batch=32)
    asyncio.run(scenario())
    assert batches == [[0], [1, 2, 3]]  # the lone first item did not wait; the three went together


def test_loop_batcher_many_tasks_each_get_their_own_answer_across_turns():
    fn = Recorded()
    batcher = LoopBatcher(fn, max_batch=16)

    async def caller(x: int) -> int:
        await asyncio.sleep(0.0005 * (x % 7))  # arrivals spread over several turns
        return await batcher.run(x)

    async def many() -> list[int]:
        return await asyncio.gather(*(caller(x) for x in range(300)))

    assert asyncio.run(many()) == [2 * x for x in range(300)]
    assert sum(batcher.sizes) == 300 and max(batcher.sizes) <= 16 and max(batcher.sizes) > 1


def test_loop_batcher_an_exception_reaches_only_its_caller_and_a_cancelled_caller_is_skipped():
    fn = Recorded()
    batcher = LoopBatcher(fn, max_batch=32)

    async def scenario() -> list:
        tasks = [asyncio.ensure_future(batcher.run(x)) for x in (1, -2, 3, 4)]
        await asyncio.sleep(0)  # every task has queued its item; the call is due in the next turn
        tasks[3].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    one, bad, three, gone = asyncio.run(scenario())
    assert (one, three) == (2, 6) and isinstance(bad, ValueError) and isinstance(gone, asyncio.CancelledError)
    assert fn.batches[0] == [1, -2, 3] and 4 not in sum(fn.batches, [])  # the batch, then each alone
    assert fn.batches[1:] == [[1], [-2], [3]]


def test_loop_batcher_shared_by_two_event_loops_keeps_their_items_apart():
    """One app served from two loops at once (two test clients in two threads): each loop's items are called
    and answered on that loop's own thread; sharing one queue made a loop answer the other's futures from the
    wrong thread, and that loop hung."""
    seen: dict[str, set[int]] = {}
    lock = threading.Lock()

    def fn(items: list[int]) -> list[int]:
        threading.Event().wait(0.002)  # the model, in C code that lets the other loop's thread run
        with lock:
            seen.setdefault(threading.current_thread().name, set()).update(x // 1000 for x in items)
        return [2 * x for x in items]

    batcher = LoopBatcher(fn, max_batch=4)
    answers: dict[int, list[int]] = {}

    def client(k: int) -> None:
        async def many() -> list[int]:
            async def one(x: int) -> int:
                threading.Event().wait(0.0003)  # the picture prepared, in C code that lets the other thread run
                return await batcher.run(x)

            return await asyncio.gather(*(one(k * 1000 + i) for i in range(200)))

        answers[k] = asyncio.run(many())

    threads = [threading.Thread(target=client, args=(k,), name=f"loop-{k}", daemon=True) for k in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a loop hung"
    for k in (1, 2):
        assert answers[k] == [2 * (k * 1000 + i) for i in range(200)]
    assert seen == {"loop-1": {1}, "loop-2": {2}}  # each loop called the model with its own items only


def test_batch_sizes_are_bounded(monkeypatch):
    import mnistlab.deploy.batcher as batcher_module

    monkeypatch.setattr(batcher_module, "SIZES_KEPT", 10)
    batcher = LoopBatcher(lambda items: items, max_batch=1)

    async def many() -> None:
        for x in range(25):
            await batcher.run(x)

    asyncio.run(many())
    assert 5 <= len(batcher.sizes) <= 10 and set(batcher.sizes) == {1}


def test_loop_batcher_bad_settings_are_refused():
    with pytest.raises(ValueError):
        LoopBatcher(lambda items: items, max_batch=0)


# --- a real model: batched answers equal one-by-one answers -------------------------------------------------

@pytest.fixture(scope="module")
def predictor() -> Predictor:
    """An untrained small CNN on digits' conventions: its outputs differ from picture to picture, which is all a
    routing test needs."""
    from mnistlab.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("cnn", num_classes=10)
    meta = {"classes": [str(i) for i in range(10)], "config": {"dataset": "digits", "model": "cnn"},
            "mean": 0.13, "std": 0.31, "model": "cnn", "step": 0}
    return Predictor.from_parts("untrained", model, meta, None, warn_uncalibrated=False)


@pytest.fixture(scope="module")
def views() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.random((28, 28)) ** 3 * 255).astype(np.uint8) for _ in range(96)]


def one_by_one(predictor: Predictor, views: list[np.ndarray]) -> list[np.ndarray]:
    """Each view's probabilities (ordered by class index), predicted alone."""
    out = []
    with torch.inference_mode():
        for view in views:
            (p,) = predictor.predict_prepared([("v", Prepared(image=view, blank=False, inverted=False))], top_k=10)
            out.append(by_class(p.top))
    return out


def by_class(top: list[dict]) -> np.ndarray:
    probs = np.zeros(len(top))
    for entry in top:
        probs[entry["index"]] = entry["probability"]
    return probs


@pytest.mark.slow
def test_prediction_batcher_from_threads_matches_one_by_one(predictor, views):
    expected = one_by_one(predictor, views)
    with prediction_batcher(predictor, max_batch=16, max_wait_ms=2) as batcher:
        asks = [Ask(f"v{i}", Prepared(image=v, blank=False, inverted=False), 10) for i, v in enumerate(views)]
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(batcher, asks))
    assert max(batcher.sizes) > 1
    for i, (answer, want) in enumerate(zip(answers, expected, strict=True)):
        assert answer.path == f"v{i}"
        np.testing.assert_allclose(by_class(answer.top), want, atol=1e-5)


@pytest.mark.slow
def test_each_ask_gets_its_own_top_k(predictor, views):
    with prediction_batcher(predictor, max_batch=8, max_wait_ms=5) as batcher:
        futures = [batcher.submit(Ask("v", Prepared(image=v, blank=False, inverted=False), k))
                   for v, k in zip(views[:8], [1, 3, 10, 2, 1, 5, 10, 4], strict=True)]
        assert [len(f.result(timeout=10).top) for f in futures] == [1, 3, 10, 2, 1, 5, 10, 4]


@pytest.mark.slow
def test_the_python_api_batched_matches_one_by_one_from_threads_and_asyncio(predictor, views):
    from PIL import Image

    from mnistlab.api import Classifier

    clf = Classifier(predictor, predictor.run_dir)
    pictures = []
    for v in views[:32]:  # dark ink on white paper, 84x84: each goes through the preprocessing
        pictures.append(Image.fromarray(255 - v).resize((84, 84)))
    expected = [by_class(p.top) for p in clf.predict(pictures, top=10)]
    with clf.batched(max_batch=8, max_wait_ms=2) as batched:
        with ThreadPoolExecutor(8) as pool:
            from_threads = list(pool.map(lambda p: batched.predict(p, top=10), pictures))

        async def from_tasks():
            return await asyncio.gather(*(batched.apredict(p, top=10) for p in pictures))

        from_asyncio = asyncio.run(from_tasks())
    for answers in (from_threads, from_asyncio):
        for answer, want in zip(answers, expected, strict=True):
            np.testing.assert_allclose(by_class(answer.top), want, atol=1e-5)


@pytest.mark.slow
def test_the_server_answers_concurrent_distinct_pictures_each_with_its_own(predictor, views):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from PIL import Image

    from mnistlab.deploy.serve.app import create_app

    app = create_app({"untrained": predictor}, max_batch=8)
    expected = one_by_one(predictor, views)
    pngs = []
    for v in views[:16]:
        buf = io.BytesIO()
        Image.fromarray(255 - v).resize((56, 56)).save(buf, "PNG")
        pngs.append(buf.getvalue())

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            as_json = [http.post("/api/predict", json={"pixels": v.reshape(-1).tolist()}) for v in views]
            as_png = [http.post("/api/predict", content=p, headers={"content-type": "image/png"}) for p in pngs]
            return await asyncio.gather(*as_json), await asyncio.gather(*as_png)

    json_answers, png_answers = asyncio.run(scenario())
    for r, want in zip(json_answers, expected, strict=True):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(by_class(r.json()["top"]), want, atol=1e-5)
    png_views = [np.asarray(r.json()["image"], dtype=np.uint8).reshape(28, 28) for r in png_answers]
    for r, want in zip(png_answers, one_by_one(predictor, png_views), strict=True):
        np.testing.assert_allclose(by_class(r.json()["top"]), want, atol=1e-5)
    assert max(app.state.served.batchers["untrained"].sizes) > 1
