"""Pass 2's image pipeline: per camera, a decode thread feeds a resize + encode thread through a bounded queue, and
the cameras of an episode run side by side, while the calling thread builds the episode's rows.

PyAV (decode), OpenCV (resize) and libjpeg-turbo (encode) release the GIL, so on several cores the stages overlap:
decoding frame k+1 while frame k is resized and encoded. The queue holds at most `depth` decoded frames per camera
(~0.9 MB each at 480x640), so memory stays flat whatever the episode length. Frames come out in decode order, and
each is encoded exactly as `shard_image` encodes it alone: the bytes do not depend on the threading. The caller
reads each encoded frame as soon as it is ready (`CameraFrames.image`), so it builds row k while later frames are
still being decoded.

`StageClock` adds up the CPU seconds each stage's threads spend (`time.thread_time`), so the benchmark can say where
pass 2's CPU goes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from jaxtyping import Bool, UInt8

from ki_data.images import shard_image

_DONE = object()  # end of a camera's frames


class StageClock:
    """CPU seconds per pipeline stage, summed over the threads that ran it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cpu_s: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.cpu_s[stage] = self.cpu_s.get(stage, 0.0) + seconds

    def timed(self, stage: str, fn: Callable[[], object]) -> object:
        t0 = time.thread_time()
        try:
            return fn()
        finally:
            self.add(stage, time.thread_time() - t0)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class CameraFrames:
    """One camera of an episode in the pipeline: its kept frames' bytes as they are encoded (`image(k)`), or all of
    them with the number of frames decoded once the camera is done (`result()`)."""

    def __init__(self) -> None:
        self._images: list[bytes] = []
        self._done = False
        self._ready = threading.Condition()
        self.future: Future[tuple[list[bytes], int]] | None = None

    def _add(self, image: bytes) -> None:
        with self._ready:
            self._images.append(image)
            self._ready.notify_all()

    def _finish(self) -> None:
        with self._ready:
            self._done = True
            self._ready.notify_all()

    def image(self, k: int) -> bytes | None:
        """The k-th kept frame's bytes, waiting for it; None when the camera ended before it (too few frames). Raises
        what stopped the decoder or encoder."""
        with self._ready:
            self._ready.wait_for(lambda: len(self._images) > k or self._done)
            if len(self._images) > k:
                return self._images[k]
        self.result()  # raises the thread's error, if that is why it ended
        return None

    def result(self, timeout: float | None = None) -> tuple[list[bytes], int]:
        return self.future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self.future.exception(timeout)


class ImagePipeline:
    """Threads for `cameras` cameras: one decoder and one encoder each, reused episode after episode."""

    def __init__(self, cameras: int, image_size: int, image_format: str, *, depth: int = 8,
                 clock: StageClock | None = None):
        self.image_size, self.image_format, self.depth = image_size, image_format, depth
        self.clock = clock or StageClock()
        n = max(1, cameras)
        self._decoders = ThreadPoolExecutor(n, thread_name_prefix="decode")
        self._encoders = ThreadPoolExecutor(n, thread_name_prefix="encode")

    @staticmethod
    def _put(out: queue.Queue, item: object, stop: threading.Event) -> bool:
        """Put `item` when there is room; False when the consumer gave up (`stop`) first."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _decode(self, frames: Iterator[UInt8[np.ndarray, "h w 3"]], out: queue.Queue, stop: threading.Event) -> None:
        """Producer: every frame in order into `out`, then _DONE (or the error); gives up when `stop` is set."""
        item: object = _DONE
        t0 = time.thread_time()
        try:
            for frame in frames:
                self.clock.add("decode", time.thread_time() - t0)
                if not self._put(out, frame, stop):
                    return
                t0 = time.thread_time()
            self.clock.add("decode", time.thread_time() - t0)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            item = _Failed(e)
        self._put(out, item, stop)

    def _encode(self, frames: Iterator[UInt8[np.ndarray, "h w 3"]], keep: Bool[np.ndarray, " n"],
                out: CameraFrames) -> tuple[list[bytes], int]:
        """Consumer: (the kept frames resized, padded and encoded, in order, each also handed to `out` at once; the
        number of frames decoded). The decoder runs on its own thread."""
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        producer = self._decoders.submit(self._decode, frames, q, stop)
        images: list[bytes] = []
        try:
            k = 0
            while True:
                item = q.get()
                if item is _DONE:
                    break
                if isinstance(item, _Failed):
                    raise item.error
                if k < len(keep) and keep[k]:
                    t0 = time.thread_time()
                    images.append(shard_image(item, self.image_size, self.image_format))
                    self.clock.add("resize_encode", time.thread_time() - t0)
                    out._add(images[-1])
                k += 1
        finally:
            stop.set()
            try:
                producer.result()
            finally:
                out._finish()
        return images, k

    def submit(self, frames: Iterator[UInt8[np.ndarray, "h w 3"]], keep: Bool[np.ndarray, " n"]) -> CameraFrames:
        """Start one camera of an episode: its frames decoded, the kept ones (keep[k] for frame k) encoded, each
        readable as soon as it is (`CameraFrames.image`); `result()` holds (the bytes, the number of frames). The
        iterator is consumed on a decoder thread only."""
        out = CameraFrames()
        out.future = self._encoders.submit(self._encode, frames, keep, out)
        return out

    def close(self) -> None:
        self._encoders.shutdown()
        self._decoders.shutdown()
