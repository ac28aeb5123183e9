"""Pass 2's image pipeline (ki_data.preprocess.pipeline): decode and encode threads with a bounded queue give exactly
the bytes of encoding frame by frame, errors on either side reach the caller, and the decoder never runs further
ahead than the queue allows."""

from __future__ import annotations

import numpy as np
import pytest

from ki_data.images import ImageFormatError, shard_image
from ki_data.preprocess.pipeline import ImagePipeline


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(n)]


class _Counted:
    """An iterator over frames that records how many it handed out (what 'decoded so far' means here)."""

    def __init__(self, frames, fail_at: int | None = None):
        self.frames, self.fail_at, self.yielded = frames, fail_at, 0

    def __iter__(self):
        for k, f in enumerate(self.frames):
            if k == self.fail_at:
                raise RuntimeError(f"decoder broke at frame {k}")
            self.yielded += 1
            yield f


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_pipelined_images_equal_frame_by_frame_encoding(image_format):
    frames = {cam: _frames(13, seed) for seed, cam in enumerate(("top", "left", "right"))}
    keep = np.ones(13, bool)
    keep[[0, 5, 12]] = False
    pipe = ImagePipeline(3, 32, image_format, depth=2)
    try:
        futures = {cam: pipe.submit(iter(f), keep) for cam, f in frames.items()}
        for cam, f in frames.items():
            blobs, n = futures[cam].result()
            assert n == 13
            assert blobs == [shard_image(x, 32, image_format) for x, k in zip(f, keep) if k]
        assert {"decode", "resize_encode"} <= set(pipe.clock.cpu_s)
    finally:
        pipe.close()


def test_a_decoder_error_reaches_the_caller_and_the_pipeline_goes_on():
    pipe = ImagePipeline(1, 32, "jpeg", depth=2)
    try:
        with pytest.raises(RuntimeError, match="decoder broke at frame 4"):
            pipe.submit(iter(_Counted(_frames(10), fail_at=4)), np.ones(10, bool)).result()
        blobs, n = pipe.submit(iter(_frames(3)), np.ones(3, bool)).result()
        assert n == 3 and len(blobs) == 3
    finally:
        pipe.close()


def test_an_encoder_error_stops_the_decoder_within_the_queue_bound(no_shape_checks):
    frames = _frames(200)
    frames[0] = np.zeros((48, 64), np.uint8)  # not RGB: shard_image refuses it
    source = _Counted(frames)
    pipe = ImagePipeline(1, 32, "jpeg", depth=3)
    try:
        with pytest.raises(ImageFormatError):
            pipe.submit(iter(source), np.ones(200, bool)).result()
    finally:
        pipe.close()
    # The decoder stopped: at most the queue (3), the frame it held and the one being put were decoded.
    assert source.yielded <= 3 + 2


def test_an_encoder_error_on_the_last_frames_does_not_wait_for_a_full_queue(no_shape_checks):
    # The decoder has put every frame and waits to put its end mark into a full queue when the encoder fails.
    frames = _frames(4)
    frames[0] = np.zeros((48, 64), np.uint8)
    pipe = ImagePipeline(1, 32, "jpeg", depth=4)
    try:
        with pytest.raises(ImageFormatError):
            pipe.submit(iter(frames), np.ones(4, bool)).result(timeout=60)
    finally:
        pipe.close()
