"""Training data: endless, seeded streams of {"image": uint8 [S, S, 3], "caption": str} examples.

A source yields cheap *records* (a file path, the raw bytes of a tar member, ...) in a shuffled
order that depends only on the seed and the epoch, and decodes a record into an example. Keeping
the two apart lets `BatchStream` skip records without decoding them: that is how a resumed run
picks up the data where it stopped, and how several loader workers share one stream.

Sources:
  * "shapes": the procedural Shapes domain (`unclip.data.shapes.ShapesDataset`);
  * a directory of images with same-named .txt captions (searched recursively);
  * WebDataset tar shards as img2dataset writes them (<key>.jpg|png|webp + <key>.txt members):
    one .tar file, a directory of them, or a glob.
"""

from __future__ import annotations

import glob
import io
import itertools
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import IterableDataset, get_worker_info

Example = dict[str, Any]  # {"image": uint8 np.ndarray [S, S, 3], "caption": str}
Batch = dict[str, Any]  # {"images": uint8 torch.Tensor [B, S, S, 3], "captions": list[str]}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
SHUFFLE_BUFFER = 1000


class DataError(ValueError):
    """A data source is missing, empty or malformed."""


def load_image(file: str | os.PathLike | io.BytesIO, size: int) -> np.ndarray:
    """Any image Pillow reads -> RGB, resized (antialiased) and centre-cropped to uint8 [size, size, 3]."""
    with Image.open(file) as image:
        fitted = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
    return np.asarray(fitted, dtype=np.uint8)


class Source(IterableDataset):
    """An endless stream of examples: epoch after epoch, each in a seeded shuffled order."""

    def records(self, epoch: int) -> Iterator[Any]:
        raise NotImplementedError

    def decode(self, record: Any) -> Example:
        raise NotImplementedError

    def endless_records(self) -> Iterator[Any]:
        for epoch in itertools.count():
            empty = True
            for record in self.records(epoch):
                empty = False
                yield record
            if empty:
                raise DataError(f"{self}: no examples")

    def __iter__(self) -> Iterator[Example]:
        return map(self.decode, self.endless_records())


class IterableSource(Source):
    """Examples from any iterable of example dicts (a torch IterableDataset, say), made afresh per epoch."""

    def __init__(self, make: Callable[[int], Iterable[Example]], name: str = "iterable"):
        self.make = make
        self.name = name

    def records(self, epoch: int) -> Iterator[Example]:
        return iter(self.make(epoch))

    def decode(self, record: Example) -> Example:
        return record

    def __repr__(self) -> str:
        return self.name


def shapes_source(size: int, seed: int, **options) -> IterableSource:
    """The Shapes train split; options are ShapesDataset's (mention_p, contrast_group, two_object_fraction, extra_vocabulary)."""
    from unclip.data.shapes import ShapesDataset  # written alongside; imported only when used

    ShapesDataset(**options)  # bad options fail here, not in the first batch
    # A new seed per epoch, in case the dataset is finite.
    return IterableSource(lambda epoch: ShapesDataset(seed=seed + epoch, size=size, split="train", **options), name="shapes")


class FolderSource(Source):
    """Images with same-named .txt captions anywhere under a directory (a.png + a.txt)."""

    def __init__(self, root: str | os.PathLike, size: int, seed: int):
        self.root = Path(root)
        self.size = size
        self.seed = seed
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        self.pairs = [(image, image.with_suffix(".txt")) for image in images if image.with_suffix(".txt").is_file()]
        if not self.pairs:
            found = f"{len(images)} image(s) but none with a same-named .txt caption" if images else "no images"
            raise DataError(f"{self.root}: {found}; expected e.g. a.png + a.txt ({', '.join(IMAGE_EXTENSIONS)})")

    def records(self, epoch: int) -> Iterator[tuple[Path, Path]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        return (self.pairs[i] for i in order)

    def decode(self, record: tuple[Path, Path]) -> Example:
        image_path, caption_path = record
        return {"image": load_image(image_path, self.size), "caption": caption_path.read_text().strip()}

    def __repr__(self) -> str:
        return str(self.root)


class TarSource(Source):
    """WebDataset shards: each sample is consecutive members <key>.<ext> sharing a key.

    Shards are read as streams in a per-epoch shuffled order; samples pass through a shuffle
    buffer as undecoded bytes, so only the samples actually used are decoded.
    """

    def __init__(self, shards: list[Path], size: int, seed: int, buffer_size: int = SHUFFLE_BUFFER):
        if not shards:
            raise DataError("no .tar shards given")
        self.shards = shards
        self.size = size
        self.seed = seed
        self.buffer_size = buffer_size

    def samples(self, shard: Path) -> Iterator[tuple[bytes, str]]:
        """(image bytes, caption) for each complete sample of one shard, in file order."""
        try:
            with tarfile.open(shard, "r|*") as archive:
                key: str | None = None
                members: dict[str, bytes] = {}
                for member in archive:
                    if not member.isfile():
                        continue
                    # The key is the name up to the first dot of its last component (WebDataset's rule).
                    directory, name = os.path.split(member.name)
                    member_key, _, extension = name.partition(".")
                    member_key = os.path.join(directory, member_key)
                    if member_key != key:
                        yield from _complete_sample(members)
                        key, members = member_key, {}
                    content = archive.extractfile(member)
                    if content is not None:  # a regular file always has content
                        members[extension.lower()] = content.read()
                yield from _complete_sample(members)
        except tarfile.TarError as error:
            raise DataError(f"{shard}: not a readable tar file: {error}") from error

    def records(self, epoch: int) -> Iterator[tuple[bytes, str]]:
        rng = random.Random(f"{self.seed}/{epoch}")
        shards = rng.sample(self.shards, len(self.shards))
        buffer: list[tuple[bytes, str]] = []
        for sample in itertools.chain.from_iterable(map(self.samples, shards)):
            if len(buffer) < self.buffer_size:
                buffer.append(sample)
                continue
            index = rng.randrange(len(buffer))
            yield buffer[index]
            buffer[index] = sample
        rng.shuffle(buffer)
        yield from buffer

    def decode(self, record: tuple[bytes, str]) -> Example:
        image_bytes, caption = record
        return {"image": load_image(io.BytesIO(image_bytes), self.size), "caption": caption}

    def __repr__(self) -> str:
        return f"{len(self.shards)} tar shard(s) ({self.shards[0]}, ...)"


def _complete_sample(members: dict[str, bytes]) -> Iterator[tuple[bytes, str]]:
    image = next((members[ext[1:]] for ext in IMAGE_EXTENSIONS if ext[1:] in members), None)
    if image is not None and "txt" in members:
        yield image, members["txt"].decode("utf-8").strip()


def open_source(spec: str, size: int, seed: int, **shapes_options) -> Source:
    """ "shapes", a directory of captioned images, a .tar shard, a directory of shards, or a glob of shards.
    shapes_options apply to shapes only (ShapesDataset's mention_p, contrast_group,
    two_object_fraction and extra_vocabulary): how often a caption states each optional attribute,
    how many scenes in a row differ from the first in one fact, how many scenes show two objects,
    and how many draw on the extra colours and shapes."""
    if spec == "shapes":
        return shapes_source(size, seed, **shapes_options)
    if shapes_options.get("contrast_group", 1) > 1:
        raise DataError(f"{spec}: contrast groups are drawn from the Shapes grammar; use them with --data shapes")
    if shapes_options.get("extra_vocabulary", 0.0) > 0:
        raise DataError(f"{spec}: the extra vocabulary is drawn from the Shapes grammar; use it with --data shapes")
    if any(char in spec for char in "*?["):
        shards = sorted(Path(p) for p in glob.glob(spec, recursive=True) if p.endswith(".tar"))
        if not shards:
            raise DataError(f"{spec}: the pattern matches no .tar files")
        return TarSource(shards, size, seed)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{spec}: no such file or directory (expected 'shapes', a directory, a .tar file or a glob)")
    if path.is_file():
        if path.suffix != ".tar":
            raise DataError(f"{spec}: a data file must be a .tar shard")
        return TarSource([path], size, seed)
    shards = sorted(path.glob("*.tar"))
    return TarSource(shards, size, seed) if shards else FolderSource(path, size, seed)


def collate(examples: list[Example]) -> Batch:
    shape = examples[0]["image"].shape
    for example in examples:
        image = example["image"]
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.shape != shape:
            raise DataError(f"examples must hold uint8 [S, S, 3] images of one size, got {image.dtype} {image.shape}")
    return {
        "images": torch.from_numpy(np.stack([example["image"] for example in examples])),
        "captions": [str(example["caption"]) for example in examples],
    }


class BatchStream(IterableDataset):
    """Collated batches from a source, starting after its first `start` examples.

    Under a DataLoader with W workers, worker k decodes batches k, k + W, ... and the loader
    interleaves them back in order, so the batches are the same whatever the number of workers.
    """

    def __init__(self, source: Source, batch_size: int, start: int = 0):
        self.source = source
        self.batch_size = batch_size
        self.start = start

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        records = itertools.islice(self.source.endless_records(), self.start, None)
        for index in itertools.count():
            chunk = list(itertools.islice(records, self.batch_size))
            if index % workers == worker:
                yield collate([self.source.decode(record) for record in chunk])
