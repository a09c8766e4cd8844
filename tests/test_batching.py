"""Batching that keeps same seed, same image: a row computed at a fixed compute batch depends on
its own inputs and seed only, whether it runs alone, among the images of its request, or in a
joint run with other requests of other step counts, samplers and guidance."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest
import torch
from parameter_cases import BATCHED

from unclip.calls import DecodeCall, SampleCall, UpsampleCall
from unclip.cancel import CancelToken
from unclip.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from unclip.local import LocalStages
from unclip.options import SamplingOptions
from unclip.parameters import GenerationParameters
from unclip.pipeline import generate
from unclip.png import read_png_text
from unclip.stage import Stage
from unclip.stages import load_engine
from unclip.stages.batcher import Batcher, BatchSettings, compute_batches
from unclip.stages.guidance import evaluate

PROMPTS = ["a red circle in the top left corner", "a blue square", "a green triangle at the bottom"]
COMPUTE_BATCHES = [1, 3, 4]


@pytest.fixture(scope="module")
def text(local_stages):
    return local_stages.encoder.encode_text(PROMPTS)


@pytest.fixture(scope="module", params=COMPUTE_BATCHES, ids=lambda n: f"cb{n}")
def engines(request):
    """The shipped prior, decoder and upsampler at one compute batch."""
    return {stage: load_engine(stage, compute_batch=request.param) for stage in (Stage.PRIOR, Stage.DECODER, Stage.UPSAMPLER)}


def test_a_row_is_the_same_in_any_batch_at_any_position(local_stages):
    """The network itself: a row's output at compute batch 4 does not depend on the other rows
    or on where in the batch it sits; alone (compute batch 1) it may differ in the last bits."""
    decoder = local_stages.decoder.model
    torch.manual_seed(0)
    rows = 7
    x, t = torch.randn(rows, 3, 32, 32), torch.randint(0, 1000, (rows,))
    conditioning = dict(
        image_embed=torch.randn(rows, 64), drop_image=torch.zeros(rows, dtype=torch.bool),
        text_encodings=torch.randn(rows, 5, 64), text_mask=torch.ones(rows, 5, dtype=torch.bool),
        drop_text=torch.zeros(rows, dtype=torch.bool),
    )  # fmt: skip
    (reference,), _ = evaluate(decoder, 4, [(x[:1], t[:1], {k: v[:1] for k, v in conditioning.items()})])
    for position in range(rows):
        order = [i for i in range(1, rows)]
        order.insert(position, 0)
        (outputs,), calls = evaluate(decoder, 4, [(x[order], t[order], {k: v[order] for k, v in conditioning.items()})])
        assert calls == 2  # 7 rows: one full chunk of 4, one padded
        assert torch.equal(outputs[position], reference[0]), position


def test_an_image_is_the_same_alone_in_its_request_and_next_to_others(engines, text):
    """Engine level, at each compute batch: an image decoded alone, as one of n images, and in a
    joint run with calls of other step counts, samplers, guidance and conditioning."""
    prior, decoder = engines[Stage.PRIOR], engines[Stage.DECODER]
    embeddings = prior.sample(text.embeddings, text.encodings, text.mask, [1, 2, 3], sampling=SamplingOptions(2))
    settings = dict(sampling=SamplingOptions(3), guidance_scale=3.0)
    alone = decoder.decode(embeddings[1:2], [7], text_encodings=text.encodings[1:2], text_mask=text.mask[1:2], **settings)
    in_request = decoder.decode(embeddings, [6, 7, 8], text_encodings=text.encodings, text_mask=text.mask, **settings)
    np.testing.assert_array_equal(in_request[1:2], alone)

    mine = DecodeCall(embeddings[1:2], seeds=[7], text_encodings=text.encodings[1:2], text_mask=text.mask[1:2], **settings)
    others = [
        DecodeCall(embeddings, seeds=[1, 2, 3], sampling=SamplingOptions(5, "ddpm")),  # no text: other shapes
        DecodeCall(embeddings[:2], seeds=[4, 5], text_encodings=text.encodings[:2], text_mask=text.mask[:2],
                   sampling=SamplingOptions(2), guidance_scale=1.0),
        DecodeCall(embeddings[2:], seeds=[9], text_encodings=text.encodings[2:], text_mask=text.mask[2:],
                   sampling=SamplingOptions(4, eta=0.5), text_guidance_scale=7.0),
    ]  # fmt: skip
    results = decoder.run_calls([(call, None, None) for call in [others[0], mine, *others[1:]]])
    np.testing.assert_array_equal(results[1], alone)
    for call, result in zip(others, [results[0], *results[2:]], strict=True):
        np.testing.assert_array_equal(result, decoder.run_calls([(call, None, None)])[0])


def test_prior_and_upsampler_rows_are_the_same_in_a_joint_run(engines, text):
    prior, upsampler = engines[Stage.PRIOR], engines[Stage.UPSAMPLER]
    calls = [
        SampleCall(text.embeddings[:1], text.encodings[:1], text.mask[:1], seeds=[3], num_candidates=2, sampling=SamplingOptions(3)),
        SampleCall(text.embeddings, text.encodings, text.mask, seeds=[4, 5, 6], guidance_scale=5.0, sampling=SamplingOptions(2)),
    ]  # fmt: skip
    joint = prior.run_calls([(call, None, None) for call in calls])
    for call, result in zip(calls, joint, strict=True):
        np.testing.assert_array_equal(result, call.run(prior))
    low = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    calls = [
        UpsampleCall(low[:1], seeds=[1], sampling=SamplingOptions(2)),
        UpsampleCall(low, seeds=[2, 3, 4], sampling=SamplingOptions(3)),
    ]
    joint = upsampler.run_calls([(call, None, None) for call in calls])
    for call, result in zip(calls, joint, strict=True):
        np.testing.assert_array_equal(result, call.run(upsampler))


def test_a_joint_run_shares_network_calls(text):
    """Rows per network call (a count, not a timing): three decoder calls with other step
    counts and guidance run in far fewer network calls together than one by one."""
    decoder = load_engine(Stage.DECODER, compute_batch=8)
    embeddings = np.tile(text.embeddings[:1], (3, 1))
    calls = [
        DecodeCall(embeddings[:1], seeds=[1], sampling=SamplingOptions(4), guidance_scale=2.0),
        DecodeCall(embeddings[:2], seeds=[2, 3], sampling=SamplingOptions(3), guidance_scale=4.0),
        DecodeCall(embeddings[:1], seeds=[4], sampling=SamplingOptions(2), guidance_scale=1.0),
    ]
    before = decoder.stats.network_calls
    for call in calls:
        call.run(decoder)
    apart = decoder.stats.network_calls - before
    before, rows_before = decoder.stats.network_calls, decoder.stats.network_rows
    decoder.run_calls([(call, None, None) for call in calls])
    together = decoder.stats.network_calls - before
    rows = decoder.stats.network_rows - rows_before
    assert (apart, together) == (4 + 3 + 2, 4)  # one call per step while any call still runs
    assert rows == 2 * 4 + 4 * 3 + 1 * 2  # rows x passes x steps: 2 passes with guidance, 1 without


def test_a_call_joins_a_running_run_and_leaves_when_it_is_done(text):
    """Continuous batching: a call that arrives while another samples joins it between steps,
    shares its network evaluations, is answered the step it finishes (before the longer call),
    and gives what it gives alone."""
    decoder = load_engine(Stage.DECODER, compute_batch=8)
    long = DecodeCall(text.embeddings[:1], seeds=[1], sampling=SamplingOptions(40), guidance_scale=3.0)
    short = DecodeCall(text.embeddings[1:2], seeds=[2], sampling=SamplingOptions(3), guidance_scale=5.0)
    expected = {"long": long.run(decoder), "short": short.run(decoder)}
    batcher = Batcher(decoder, BatchSettings(compute_batch=8))
    started = threading.Event()
    try:
        before = decoder.stats.network_calls
        first = batcher.enqueue(long, CancelToken(), lambda step, total, x0: step >= 5 and started.set())
        assert started.wait(60)
        second = batcher.enqueue(short, CancelToken())
        second_result = second.result(60)
        assert not first.done()  # answered while the long call still samples
        first_result = first.result(60)
        assert decoder.stats.network_calls - before == 40  # the short call's 3 steps rode along
        assert list(batcher.runs) == [1, 1]  # admitted one at a time, into the same run
    finally:
        batcher.close(timeout=60)
    np.testing.assert_array_equal(first_result, expected["long"])
    np.testing.assert_array_equal(second_result, expected["short"])


def test_a_refused_or_stopped_call_fails_alone(text):
    decoder = load_engine(Stage.DECODER, compute_batch=4)
    good = DecodeCall(text.embeddings[:1], seeds=[1], sampling=SamplingOptions(3))
    bad = DecodeCall(text.embeddings[:1], seeds=[1, 2], sampling=SamplingOptions(3))
    late = DecodeCall(text.embeddings[:1], seeds=[3], sampling=SamplingOptions(50))
    cancel = CancelToken(deadline=time.monotonic() - 1)
    results = decoder.run_calls([(good, None, None), (bad, None, None), (late, cancel, None)])
    np.testing.assert_array_equal(results[0], good.run(decoder))
    assert isinstance(results[1], InvalidArgument) and "one seed per row" in str(results[1])
    assert isinstance(results[2], DeadlineExceeded)


def test_the_pipeline_gives_the_same_images_alone_in_a_batch_and_concurrently(local_stages_batched):
    """In-process: image 1 of an n=3 request is the n=1 image of its seed (compute batch 4), and
    requests running concurrently, sharing the decoder's joint run (compute batch 16, room for
    all their rows), give what each gives alone."""
    fast = dict(prior_steps=2, decoder_steps=2, upsampler_steps=1)
    requests = [
        GenerationParameters(prompt=PROMPTS[0], seed=11, n=3, **fast),
        GenerationParameters(prompt=PROMPTS[1], seed=5, prior_guidance_scale=5.0, **fast),
        GenerationParameters(prompt=PROMPTS[2], seed=8, decoder_guidance_scale=4.0, size=32, **fast),
    ]
    in_request = asyncio.run(generate(local_stages_batched, requests[0]))
    single = asyncio.run(generate(local_stages_batched, GenerationParameters(prompt=PROMPTS[0], seed=12, n=1, **fast)))
    assert in_request[1].png == single[0].png

    # Batchers that wait for company, so the requests surely meet.
    waiting = LocalStages.load(settings=dict.fromkeys(Stage, BatchSettings(compute_batch=16, batch_wait_s=0.5)))
    try:
        alone = [asyncio.run(generate(waiting, params)) for params in requests]
        decoder_runs = waiting.batchers[Stage.DECODER][0].runs
        decoder_runs.clear()
        together: list = [None] * len(requests)
        start = threading.Barrier(len(requests))

        def run(index: int) -> None:
            start.wait()
            together[index] = asyncio.run(generate(waiting, requests[index]))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        waiting.shutdown()
    for expected, got in zip(alone, together, strict=True):
        assert [image.png for image in got] == [image.png for image in expected]
    assert sum(decoder_runs) == len(requests) and max(decoder_runs) > 1  # requests shared runs


def test_a_call_waits_while_the_run_has_no_room_for_its_rows(text):
    """Beyond one compute batch, joining would only share the device: at compute batch 2 a
    second guided call (2 rows a step) waits for the first to finish, then runs."""
    decoder = load_engine(Stage.DECODER, compute_batch=2)
    first_call = DecodeCall(text.embeddings[:1], seeds=[1], sampling=SamplingOptions(8), guidance_scale=3.0)
    second_call = DecodeCall(text.embeddings[1:2], seeds=[2], sampling=SamplingOptions(2), guidance_scale=3.0)
    batcher = Batcher(decoder, BatchSettings(compute_batch=2))
    started = threading.Event()
    try:
        first = batcher.enqueue(first_call, CancelToken(), lambda step, total, x0: started.set())
        assert started.wait(60)
        second = batcher.enqueue(second_call, CancelToken())
        second.result(60)
        assert first.done()  # a shorter call admitted beside it would have finished first
        assert list(batcher.runs) == [1, 1]
    finally:
        batcher.close(timeout=60)
    np.testing.assert_array_equal(second.result(), second_call.run(decoder))


def test_the_compute_batch_is_recorded_with_every_image(local_stages, local_stages_batched):
    params = GenerationParameters(prompt=PROMPTS[0], seed=2, prior_steps=2, decoder_steps=2, upsampler_steps=1)
    at_1 = asyncio.run(generate(local_stages, params))[0]
    batched = asyncio.run(generate(local_stages_batched, params))[0]
    assert '"decoder": 1' in read_png_text(at_1.png)["compute_batch"]
    expected = {stage.version_key(): n for stage, n in compute_batches(BATCHED).items()}  # one upsampler
    assert json.loads(read_png_text(batched.png)["compute_batch"]) == expected


def test_the_batcher_refuses_beyond_its_limit_and_after_closing():
    started, release = threading.Event(), threading.Event()

    class SlowEngine:
        def run_calls(self, calls):
            started.set()
            release.wait(10)
            return [call for call, _, _ in calls]

    batcher = Batcher(SlowEngine(), BatchSettings(max_batch_size=1, max_pending=2))
    first = batcher.enqueue("a", CancelToken())
    assert started.wait(10)
    second = batcher.enqueue("b", CancelToken())
    with pytest.raises(ResourceExhausted, match="limit 2"):
        batcher.enqueue("c", CancelToken())
    cancelled = CancelToken()
    release.set()
    assert first.result(10) == "a" and second.result(10) == "b"
    third = batcher.enqueue("d", cancelled)
    assert third.result(10) == "d"
    cancelled.cancel()
    late = batcher.enqueue("e", cancelled)  # its caller left before it ran
    with pytest.raises(Cancelled):
        late.result(10)
    batcher.close()
    with pytest.raises(Unavailable, match="shutting down"):
        batcher.enqueue("f", CancelToken())


def test_compute_batch_flags():
    assert compute_batches("4") == dict.fromkeys(Stage, 4)
    assert compute_batches("prior=16,decoder=2") == {Stage.ENCODER: 1, Stage.PRIOR: 16, Stage.DECODER: 2, Stage.UPSAMPLER: 1}
    for bad, message in [("0", "positive integer"), ("decoder=x", "positive integer"), ("vae=2", "unknown stage 'vae'")]:
        with pytest.raises(ValueError, match=message):
            compute_batches(bad)


def test_stopping_a_gateway_leaves_the_in_process_stages_it_served_running(local_stages):
    """A gateway closes its backend's connections when it stops; stages loaded in-process may
    serve other front-ends, so only `shutdown` by their owner stops them."""
    from gateway.api import ImageAPI
    from gateway.servicer import ImageServicer

    asyncio.run(ImageServicer(ImageAPI(local_stages)).close())
    call = UpsampleCall(np.zeros((1, 8, 8, 3), np.uint8), seeds=[0], sampling=SamplingOptions(1))
    assert asyncio.run(local_stages.run(call, deadline=None)).shape == (1, 32, 32, 3)
    stages = LocalStages.load()
    stages.shutdown()
    with pytest.raises(Unavailable, match="shutting down"):
        asyncio.run(stages.run(call, deadline=None))


def test_cpu_engines_compute_on_one_thread_of_the_process(local_stages):
    """Every CPU network of the in-process stack runs on the one compute thread (not the
    caller's, not a thread per stage): libgomp slows small ops down once several threads each
    hold an OpenMP team (unclip/stages/compute.py)."""
    from unclip.stages import compute

    seen: dict[str, set[int]] = {}
    hooks = []
    for stage, engines in local_stages.engines.items():
        for engine in engines:
            record = seen.setdefault(stage.value, set())
            network = engine.model.transformer if stage is Stage.ENCODER else engine.model  # open_clip's text tower
            hooks.append(network.register_forward_hook(lambda *_, r=record: r.add(threading.get_ident())))
    try:
        params = GenerationParameters(prompt=PROMPTS[0], seed=2, prior_steps=2, decoder_steps=2, upsampler_steps=2)
        asyncio.run(generate(local_stages, params))
    finally:
        for hook in hooks:
            hook.remove()
    assert all(seen.values()) and len(seen) == len(Stage)
    threads = set().union(*seen.values())
    assert threads == {compute._ident} and threading.get_ident() not in threads
