"""api.decoding: uploads decode in helper processes; a decoder crash or hang costs that upload only.

The crashes are real (tests.indexer.crash_codec sends SIGSEGV to the decoding process). The helper
processes are forked here so they inherit the test-only Pillow plugin; the server default is spawn.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient
from retrieval.api.app import create_app
from retrieval.api.decoding import CRASH_DETAIL, TIMEOUT_DETAIL, DecoderCrashed, UploadDecoder

from retrieval.errors import ImageDecodeError
from retrieval.imaging.preprocess import PreprocessConfig, load_and_preprocess
from tests.api.conftest import Indexed
from tests.images import encode, photo
from tests.indexer.crash_codec import HANG_MAGIC, MAGIC, register

CONFIG = PreprocessConfig(resize_shortest_edge=64, crop_height=56, crop_width=56)
CRASHER = MAGIC + b"\x00" * 64
HANGER = HANG_MAGIC + b"\x00" * 64


@pytest.fixture(autouse=True)
def _crash_codec() -> None:
    register()


def _jpeg(seed: int) -> bytes:
    return encode(photo(80, 60, seed=seed), "JPEG", quality=90)


@pytest.mark.parametrize("workers", [0, 2])
def test_decodes_like_the_indexer_and_reports_bad_input(workers: int) -> None:
    decoder = UploadDecoder(workers, "fork")
    decoder.start()
    try:
        got = asyncio.run(decoder.decode(_jpeg(1), CONFIG, 10**8))
        np.testing.assert_array_equal(got, load_and_preprocess(_jpeg(1), CONFIG, 10**8)[0])
        with pytest.raises(ImageDecodeError) as err:
            asyncio.run(decoder.decode(b"not an image at all", CONFIG, 10**8))
        assert err.value.failure_kind == "not_an_image"
    finally:
        decoder.close()


def test_a_crashing_upload_fails_alone_and_the_others_are_answered() -> None:
    decoder = UploadDecoder(2, "fork")
    decoder.start()

    async def together() -> list:
        uploads = [_jpeg(i) for i in range(6)]
        uploads.insert(2, CRASHER)
        return await asyncio.gather(*(decoder.decode(u, CONFIG, 10**8) for u in uploads), return_exceptions=True)

    try:
        out = asyncio.run(together())
        assert isinstance(out[2], DecoderCrashed)
        good = [o for i, o in enumerate(out) if i != 2]
        assert all(isinstance(o, np.ndarray) and o.shape == (3, 56, 56) for o in good), good
        assert decoder.crashes == 1  # a helper decodes one upload at a time: the culprit is known, none retried
        # the pool was replaced: later uploads decode as usual
        assert asyncio.run(decoder.decode(_jpeg(9), CONFIG, 10**8)).shape == (3, 56, 56)
    finally:
        decoder.close()


def test_the_server_answers_422_and_keeps_serving(indexed: Indexed) -> None:
    settings = indexed.settings(upload_decode_workers=1, upload_decode_start_method="fork")
    with TestClient(create_app(settings)) as client:
        r = client.post("/search?k=3", files={"file": ("x.jpg", CRASHER, "image/jpeg")})
        assert r.status_code == 422 and r.json() == {"detail": CRASH_DETAIL}
        r = client.post("/search?k=3", files={"file": ("ok.jpg", _jpeg(3), "image/jpeg")})
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        assert client.get("/healthz").status_code == 200


@pytest.mark.timeout(60, method="thread")
def test_a_hanging_upload_is_stopped_at_the_time_limit_and_the_others_are_answered() -> None:
    decoder = UploadDecoder(2, "fork", timeout_s=1.0)
    decoder.start()

    async def together() -> list:
        uploads = [_jpeg(i) for i in range(4)]
        uploads.insert(1, HANGER)
        return await asyncio.gather(*(decoder.decode(u, CONFIG, 10**8) for u in uploads), return_exceptions=True)

    try:
        out = asyncio.run(together())
        assert isinstance(out[1], DecoderCrashed) and str(out[1]) == TIMEOUT_DETAIL
        assert all(isinstance(o, np.ndarray) for i, o in enumerate(out) if i != 1), out
        assert asyncio.run(decoder.decode(_jpeg(9), CONFIG, 10**8)).shape == (3, 56, 56)
    finally:
        decoder.close()


@pytest.mark.timeout(120, method="thread")
def test_the_server_answers_a_hanging_upload_with_422_and_keeps_serving(indexed: Indexed) -> None:
    settings = indexed.settings(upload_decode_workers=1, upload_decode_start_method="fork", decode_timeout_s=1.0)
    with TestClient(create_app(settings)) as client:
        r = client.post("/search?k=3", files={"file": ("x.jpg", HANGER, "image/jpeg")})
        assert r.status_code == 422 and r.json() == {"detail": TIMEOUT_DETAIL}
        r = client.post("/search?k=3", files={"file": ("ok.jpg", _jpeg(3), "image/jpeg")})
        assert r.status_code == 200 and len(r.json()["results"]) == 3
