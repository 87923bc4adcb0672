"""Images of a folder reference decoded when a stage asks for them, not all at once.

A reference that would decode to more than ``Limits.max_resident_bytes`` (an ImageNet-sized folder)
is not held in memory: :class:`StreamedImages` stands where :class:`clipguard.data.ImageData` keeps its
uint8 tensor, and indexing it (``images[idx]``, the only way the engine reads images) decodes those
files, on a small pool of threads, into a tensor of that batch. What is resident is then one batch,
whatever the size of the data: the stages already read the data in batches (the statistics sample,
detection's screen, the flagged class, the unlearning slice, the evaluation).

Each image passes the checks of the in-memory decoder (declared size before decoding, the model's
input size, one size for all unless resizing), but when it is first read rather than at load time, so
a bad file far into a streamed folder fails the run at that point, with its name. One read is capped
(``Limits.max_batch_bytes``) so a stage that asks for a whole large set at once fails with a clear
error rather than exhausting memory.

Only folders stream: a compressed archive can only be read from its start, so ``.tar.gz`` and
``.zip`` references keep the in-memory path and its caps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from clipguard.data import Limits, _read_regular, _Sizes, decode_image
from clipguard.errors import DataError

DECODE_THREADS = min(4, os.cpu_count() or 1)
"""Threads decoding one batch (PIL releases the GIL while it decodes): a bounded pool, not one per file."""
SERIAL_BELOW = 32
"""Fewer files than this are decoded in the calling thread: a pool costs more than it saves on them."""


class StreamedImages:
    """uint8 ``(N, 3, H, W)`` images of ``files``, decoded when indexed; indexing returns a tensor.

    ``take(indices)`` is a view on some of the files (``ImageData.subset``), decoding nothing.
    """

    dtype = torch.uint8

    def __init__(
        self,
        files: Sequence[Path],
        size: tuple[int, int],
        *,
        sizes: _Sizes,
        label: str,
        threads: int = DECODE_THREADS,
    ) -> None:
        self._files = list(files)
        self._size = size
        self._sizes = sizes
        self._label = label
        self._threads = max(1, threads)

    # the parts of a tensor's interface ImageData and the stages use
    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self._files), 3, *self._size))

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self._files)

    @property
    def limits(self) -> Limits:
        return self._sizes.limits

    def take(self, indices: torch.Tensor | Sequence[int]) -> StreamedImages:
        idx = torch.as_tensor(indices, dtype=torch.int64).tolist()
        return StreamedImages(
            [self._files[i] for i in idx], self._size, sizes=self._sizes, label=self._label, threads=self._threads
        )

    def __getitem__(self, key: int | slice | torch.Tensor | Sequence[int]) -> torch.Tensor:
        if isinstance(key, int):
            return self._decode([key])[0]
        if isinstance(key, slice):
            return self._decode(range(len(self._files))[key])
        idx = torch.as_tensor(key)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        return self._decode(idx.flatten().tolist())

    def _decode(self, positions: Sequence[int]) -> torch.Tensor:
        h, w = self._size
        nbytes = len(positions) * 3 * h * w
        if nbytes > self.limits.max_batch_bytes:
            raise DataError(
                f"{self._label}: a stage asked for {len(positions)} streamed images at once ({nbytes} bytes), over "
                f"the cap of {self.limits.max_batch_bytes} bytes; fewer samples per stage, or data that fits in memory"
            )
        out = np.empty((len(positions), h, w, 3), dtype=np.uint8)

        def one(i: int) -> None:
            path = self._files[positions[i]]
            blob = _read_regular(path, self.limits.max_member_bytes, self._label)
            out[i] = decode_image(blob, path.name, self._sizes, self._size, self._label)

        if len(positions) < SERIAL_BELOW or self._threads == 1:
            for i in range(len(positions)):
                one(i)
        else:
            with ThreadPoolExecutor(self._threads) as pool:
                list(pool.map(one, range(len(positions))))
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
