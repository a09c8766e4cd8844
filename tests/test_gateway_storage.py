"""The gateway with its object store (a real S3 server on loopback) and both public APIs:
gRPC ImageService and the OpenAI-compatible HTTP API driven by the official `openai` package."""

from __future__ import annotations

import base64
import io
import json
import urllib.request

import grpc
import numpy as np
import openai
import pytest
import urllib3
from PIL import Image
from s3server import free_ports, s3_server_fixture
from servers import BackgroundServer

from gateway.app import build_gateway
from unclip.storage import StorageConfig
from unclip.v1 import images_pb2, images_pb2_grpc

# Starts a SeaweedFS server.
pytestmark = pytest.mark.slow

s3_server = s3_server_fixture("module")
FAST = dict(prior_steps=2, decoder_steps=2, upsampler_steps=1)


def storage_config(server, **overrides) -> StorageConfig:
    fields = dict(endpoint=server.endpoint, access_key=server.access_key, secret_key=server.secret_key, bucket="gateway-results")
    fields.update(overrides)
    return StorageConfig(**fields)


class Gateway:
    def __init__(self, backend, storage: StorageConfig | None):
        self.http_port = free_ports(1)[0]
        self.context = BackgroundServer(
            lambda: build_gateway(backend, host="127.0.0.1", port=0, http_port=self.http_port, storage=storage)
        )

    def __enter__(self):
        server = self.context.__enter__()
        self.store = server.servicer.api.store
        self.channel = grpc.insecure_channel(server.address)
        self.stub = images_pb2_grpc.ImageServiceStub(self.channel)
        self.openai = openai.OpenAI(base_url=f"http://127.0.0.1:{self.http_port}/v1", api_key="unused", max_retries=0)
        return self

    def __exit__(self, *exc_info):
        self.channel.close()
        self.context.__exit__(*exc_info)


@pytest.fixture(scope="module")
def gateway(s3_server, local_stages):
    with Gateway(local_stages, storage_config(s3_server)) as running:
        yield running


def generate_request(prompt="a red circle", *, url=False, key="", **params):
    return images_pb2.GenerateRequest(
        parameters=images_pb2.GenerationParameters(prompt=prompt, **{**FAST, "size": 32, **params}),
        delivery=images_pb2.Delivery(
            response_format=images_pb2.RESPONSE_FORMAT_URL if url else images_pb2.RESPONSE_FORMAT_PNG_BYTES,
            idempotency_key=key,
        ),
    )


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def objects_under(server, prefix: str) -> list[str]:
    return sorted(o.object_name for o in server.client().list_objects("gateway-results", prefix=prefix, recursive=True))


def test_results_and_record_are_stored(gateway, s3_server):
    reply = gateway.stub.Generate(generate_request(n=2, seed=5), metadata=[("x-request-id", "stored-1")], timeout=120)
    assert len(reply.images) == 2 and reply.images[0].png and not reply.images[0].url
    keys = objects_under(s3_server, f"results/{reply.request_id}/")
    assert keys == [f"results/{reply.request_id}/{name}" for name in ("image-0.png", "image-1.png", "record.json")]
    stored = s3_server.client().get_object("gateway-results", keys[0]).read()
    assert stored == reply.images[0].png
    record = json.loads(s3_server.client().get_object("gateway-results", keys[2]).read())
    assert record["operation"] == "generate" and record["seeds"] == [5, 6]
    assert record["parameters"]["prompt"] == "a red circle" and record["parameters"]["decoder_steps"] == 2
    assert set(record["models"]) >= {"clip", "prior", "decoder"} and record["timings"]["total"] > 0
    assert record["x_request_id"] == "stored-1"  # the request that made it, for its logs


def test_url_response_points_at_the_stored_png(gateway):
    by_url = gateway.stub.Generate(generate_request(url=True, seed=9), timeout=120)
    assert by_url.images[0].png == b"" and by_url.images[0].url.startswith("http://")
    by_bytes = gateway.stub.Generate(generate_request(seed=9), timeout=120)
    assert fetch(by_url.images[0].url) == by_bytes.images[0].png


def test_idempotent_retry_returns_the_stored_result(gateway, s3_server, local_stages):
    first = gateway.stub.Generate(generate_request(key="retry-me", seed=3), timeout=120)
    decodes_before = local_stages.decoder.stats.completed
    again = gateway.stub.Generate(generate_request(key="retry-me", seed=3), timeout=120)
    assert local_stages.decoder.stats.completed == decodes_before  # nothing was generated again
    assert again.request_id == first.request_id
    assert [i.png for i in again.images] == [i.png for i in first.images]
    assert len(objects_under(s3_server, f"results/{first.request_id}/")) == 2  # one image + record, no duplicate
    with pytest.raises(grpc.RpcError) as info:
        gateway.stub.Generate(generate_request(key="retry-me", seed=4), timeout=120)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "different request" in info.value.details()


def test_storage_outage_is_unavailable(s3_server, local_stages):
    dead = storage_config(s3_server, endpoint=f"127.0.0.1:{free_ports(1)[0]}")
    with Gateway(local_stages, dead) as running:
        # Images in the answer still come: the result is not stored (logged).
        assert running.stub.Generate(generate_request(seed=1), timeout=120).images[0].png
        with pytest.raises(grpc.RpcError) as info:  # URLs cannot
            running.stub.Generate(generate_request(seed=1, url=True), timeout=120)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "object store is unavailable" in info.value.details() and dead.endpoint not in info.value.details()


def test_a_save_that_fails_part_way_leaves_nothing_in_the_bucket(gateway, s3_server, monkeypatch):
    """The images reach the real store, then the record's write fails: a caller asking for URLs
    gets UNAVAILABLE and the bucket holds nothing of the request."""
    client = gateway.store._client
    put_object = client.put_object
    written = []

    def fail_on_the_record(bucket, key, *args, **kwargs):
        if key.endswith("/record.json"):
            raise urllib3.exceptions.ProtocolError("connection reset while writing the record")
        written.append(key)
        return put_object(bucket, key, *args, **kwargs)

    monkeypatch.setattr(client, "put_object", fail_on_the_record)
    before = objects_under(s3_server, "results/")
    with pytest.raises(grpc.RpcError) as info:
        gateway.stub.Generate(generate_request(n=2, seed=31, url=True), timeout=120)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(written) == 2  # both images had landed before the record failed
    assert objects_under(s3_server, "results/") == before


def test_stream_sends_previews(gateway):
    events = list(
        gateway.stub.GenerateStream(
            images_pb2.GenerateStreamRequest(
                parameters=images_pb2.GenerationParameters(
                    prompt="a red circle",
                    size=32,
                    seed=2,
                    prior_steps=2,
                    decoder_steps=4,
                    preview_every=2,
                )
            ),
            timeout=120,
        )
    )
    previews = [e.preview for e in events if e.HasField("preview")]
    assert [(p.step, p.total_steps) for p in previews] == [(2, 4), (4, 4)]
    last_preview = np.asarray(Image.open(io.BytesIO(previews[-1].png[0])))
    final = np.asarray(Image.open(io.BytesIO(events[-1].result.images[0].png)))
    np.testing.assert_array_equal(last_preview, final)  # the last estimate is the image


def test_grpc_manipulations(gateway):
    source = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(source, "PNG")
    params = images_pb2.GenerationParameters(size=32, seed=1, **FAST)
    variations = gateway.stub.CreateVariations(
        images_pb2.CreateVariationsRequest(
            image=source.getvalue(), parameters=images_pb2.GenerationParameters(n=2, size=32, **FAST)
        ),
        timeout=120,
    )
    assert len(variations.result.images) == 2
    interpolation = gateway.stub.Interpolate(
        images_pb2.InterpolateRequest(
            prompts=images_pb2.PromptPair(first="a red circle", second="a blue square"),
            frames=3,
            animated_gif=True,
            parameters=params,
            delivery=images_pb2.Delivery(response_format=images_pb2.RESPONSE_FORMAT_URL),
        ),
        timeout=120,
    )
    assert len(interpolation.result.images) == 3 and interpolation.result.gif == b""
    assert Image.open(io.BytesIO(fetch(interpolation.result.gif_url))).n_frames == 3
    diff = gateway.stub.TextDiff(
        images_pb2.TextDiffRequest(
            image=source.getvalue(), caption="a red circle", target_caption="a blue circle", frames=2, parameters=params
        ),
        timeout=120,
    )
    assert len(diff.result.images) == 2
    with pytest.raises(grpc.RpcError) as info:
        gateway.stub.Interpolate(images_pb2.InterpolateRequest(frames=3, parameters=params), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        gateway.stub.CreateVariations(images_pb2.CreateVariationsRequest(image=b"GIF89a....", parameters=params), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image" in info.value.details()


def test_openai_client_end_to_end(gateway):
    client = gateway.openai
    b64 = client.images.generate(prompt="a red circle", n=2, size="32x32", response_format="b64_json", extra_body={"seed": 7})
    pngs = [base64.b64decode(item.b64_json) for item in b64.data]
    assert [Image.open(io.BytesIO(p)).size for p in pngs] == [(32, 32), (32, 32)]
    by_url = client.images.generate(prompt="a red circle", n=1, size="32x32", response_format="url", extra_body={"seed": 7})
    assert fetch(by_url.data[0].url) == pngs[0]  # same seed, same image, whichever way it is delivered

    source = io.BytesIO()
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[:16, :16, 3] = 0
    Image.fromarray(rgba, "RGBA").save(source, "PNG")
    edited = client.images.edit(
        image=("in.png", source.getvalue(), "image/png"), prompt="a blue square", size="32x32", response_format="b64_json"
    )
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).convert("RGB"))
    transparent = rgba[..., 3] == 0
    assert (pixels[~transparent] == 200).all()  # outside the transparent region the image is kept
    assert not (pixels[transparent] == 200).all()  # inside it, new content
    variation = client.images.create_variation(
        image=("in.png", source.getvalue(), "image/png"), n=1, size="32x32", response_format="b64_json"
    )
    assert len(variation.data) == 1
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a red circle", size="64x64")
    assert "size" in str(info.value)


def test_concurrent_retries_with_one_key_generate_once(gateway, s3_server, local_stages):
    decodes_before = local_stages.decoder.stats.completed
    futures = [gateway.stub.Generate.future(generate_request(key="twice-at-once", seed=12), timeout=120) for _ in range(3)]
    replies = [future.result() for future in futures]
    assert len({reply.request_id for reply in replies}) == 1
    assert len({reply.images[0].png for reply in replies}) == 1
    assert local_stages.decoder.stats.completed == decodes_before + 1
    assert len(objects_under(s3_server, f"results/{replies[0].request_id}/")) == 2
