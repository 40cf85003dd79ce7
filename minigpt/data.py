"""Text, character tokenizer and batches of random windows, as a LightningDataModule."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

log = logging.getLogger(__name__)

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


class CharTokenizer:
    """Maps each distinct character of a text to an integer: its rank in sorted order."""

    def __init__(self, vocab: str):
        if len(set(vocab)) != len(vocab) or list(vocab) != sorted(vocab):
            raise ValueError("vocab must be a string of distinct characters in sorted order")
        self.vocab = vocab
        # code points in sorted order, so that encoding is one vectorised binary search
        self._codes = torch.tensor([ord(c) for c in vocab], dtype=torch.int64)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def dtype(self) -> torch.dtype:
        """The smallest integer type that holds every token id (uint8 for TinyShakespeare's 65)."""
        if self.vocab_size <= 256:
            return torch.uint8
        return torch.int16 if self.vocab_size <= 2**15 else torch.int32

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of `text` as a 1-D tensor of `self.dtype`; unknown characters raise a ValueError naming them."""
        codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
        ids = torch.searchsorted(self._codes, codes).clamp_(max=self.vocab_size - 1)
        unknown = self._codes[ids] != codes
        if unknown.any():
            chars = sorted({chr(c) for c in codes[unknown].tolist()})
            raise ValueError(
                f"{len(chars)} character(s) are not in the vocabulary: {', '.join(map(repr, chars))}. "
                f"The vocabulary has {self.vocab_size} characters: {self.vocab!r}"
            )
        return ids.to(self.dtype)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.vocab[i] for i in torch.as_tensor(ids).tolist())


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download(url: str, dest: Path, sha256: str | None, timeout: float = 30.0) -> None:
    """Fetch `url` to `dest` atomically: the file appears complete and verified, or not at all."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("Downloading %s to %s", url, dest)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        payload = response.read()
    digest = hashlib.sha256(payload).hexdigest()
    if sha256 and digest != sha256:
        raise ValueError(f"Download from {url} has sha256 {digest}, expected {sha256}; nothing was written. "
                         "Check data.url and data.sha256 (data.sha256=null accepts any file).")
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)  # atomic on POSIX: readers never see a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_text_file(path: str | None, cache_file: Path, url: str | None, sha256: str | None) -> Path:
    """Where the text comes from: `path` if given, else the cache, else a verified download into the cache."""
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"data.path={path} does not exist or is not a file. Give the path of a UTF-8 text file.")
        return file
    if cache_file.is_file():
        if sha256 and (digest := sha256_of(cache_file)) != sha256:
            raise ValueError(
                f"The cached data file {cache_file} has sha256 {digest}, expected {sha256}: it is damaged or a "
                f"different file. Delete it to download it again from {url}, or pass data.path={cache_file} to "
                "train on it as your own corpus."
            )
        return cache_file
    if url is None:
        raise FileNotFoundError(f"No data file: {cache_file} does not exist and no data.url is set to fetch it from.")
    try:
        download(url, cache_file, sha256)
    except (urllib.error.URLError, OSError) as err:
        raise FileNotFoundError(
            f"The data file is not at {cache_file} and could not be downloaded from {url} ({err}). "
            f"Download it on a machine with network access and copy it to {cache_file} "
            f"(or set MINIGPT_CACHE_DIR to the folder that holds {cache_file.parent.name}/{cache_file.name}), "
            "or pass data.path=/path/to/input.txt."
        ) from err
    return cache_file


def read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{file} is not UTF-8 text (byte {err.start}: {err.reason}). Convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {file} > {file.stem}.utf8.txt`, and pass that file as data.path."
        ) from None


def windows(tokens: torch.Tensor, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for windows starting at `starts`: x = tokens[i:i+T], y = tokens[i+1:i+T+1]."""
    offsets = starts[:, None] + torch.arange(block_size + 1, device=starts.device)  # (B, T+1)
    chunk = tokens[offsets].long()  # one gather for the whole batch, no Python loop per sample
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()  # (B, T), (B, T)


def batch_seed(seed: int, rank: int, index: int) -> int:
    """A seed for one batch, mixed by a hash: the CPU generator uses only the low 32 bits of its seed."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class RandomWindows(IterableDataset):
    """An endless stream of batches of random windows.

    Batch `i` is drawn from a generator seeded with (seed, rank, i) alone, so a run resumed at batch `i`
    sees exactly the batches an uninterrupted run would, and each DDP rank sees different windows.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, seed: int, rank: int = 0, start: int = 0):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.start = seed, rank, start

    def __iter__(self):
        device = self.tokens.device  # on a GPU the windows are drawn and gathered there: no copy per batch
        generator = torch.Generator(device)
        high = len(self.tokens) - self.block_size  # the last start whose target still fits
        i = self.start
        while True:
            generator.manual_seed(batch_seed(self.seed, self.rank, i))
            starts = torch.randint(high, (self.batch_size,), generator=generator, device=device)
            yield windows(self.tokens, starts, self.block_size)
            i += 1


class TextDataModule(L.LightningDataModule):
    """A character-level corpus split into the first `train_fraction` for training and the rest for validation.

    Training batches are random windows; the validation set is a fixed set of windows, the same at every
    validation, so `val/loss` is comparable across steps and runs.
    """

    def __init__(
        self,
        path: str | None = None,
        name: str = "tinyshakespeare",
        url: str | None = TINYSHAKESPEARE_URL,
        sha256: str | None = TINYSHAKESPEARE_SHA256,
        cache_dir: str = "~/.cache/minigpt",
        block_size: int = 128,
        batch_size: int = 32,
        train_fraction: float = 0.9,
        val_batches: int | None = 10,
        seed: int = 1337,
        tokens_on_gpu: bool = True,
    ):
        super().__init__()
        if batch_size <= 0 or block_size <= 0:
            raise ValueError(f"data.batch_size and data.block_size must be positive, got {batch_size} and {block_size}")
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"data.train_fraction must be between 0 and 1, got {train_fraction}")
        if val_batches is not None and val_batches <= 0:
            raise ValueError(f"data.val_batches must be positive, or null for the whole split, got {val_batches}")
        self.save_hyperparameters()
        self.cache_file = Path(cache_dir).expanduser() / name / (Path(url).name if url else "input.txt")
        self.tokenizer: CharTokenizer | None = None

    def prepare_data(self) -> None:
        resolve_text_file(self.hparams.path, self.cache_file, self.hparams.url, self.hparams.sha256)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:  # train.py sets up early to read the vocabulary; the Trainer calls again
            return
        hp = self.hparams
        file = resolve_text_file(hp.path, self.cache_file, hp.url, hp.sha256)
        text = read_text(file)
        n_train = int(len(text) * hp.train_fraction)
        shortest = min(n_train, len(text) - n_train)
        if shortest < hp.block_size + 1:
            needed = int((hp.block_size + 1) / min(hp.train_fraction, 1 - hp.train_fraction)) + 1
            raise ValueError(
                f"{file} has {len(text)} characters: too short for block_size={hp.block_size}. Each split needs "
                f"block_size + 1 characters, so at least {needed} in all. Use a longer text or a smaller model.block_size."
            )
        self.tokenizer = CharTokenizer.from_text(text)
        tokens = self.tokenizer.encode(text)  # uint8 for up to 256 characters: 1 byte per character
        self.train_tokens, self.val_tokens = tokens[:n_train], tokens[n_train:]
        log.info(
            "%s: %d characters, vocabulary of %d, %d for training and %d for validation",
            file, len(text), self.tokenizer.vocab_size, len(self.train_tokens), len(self.val_tokens),
        )
        self.val_set = TensorDataset(*self._validation_windows())

    def _validation_windows(self) -> tuple[torch.Tensor, torch.Tensor]:
        hp, T = self.hparams, self.hparams.block_size
        if hp.val_batches is None:  # the whole split, in non-overlapping windows
            starts = torch.arange(0, len(self.val_tokens) - T, T)
        else:  # a fixed sample: the generator is seeded independently of training
            generator = torch.Generator().manual_seed(hp.seed)
            starts = torch.randint(len(self.val_tokens) - T, (hp.val_batches * hp.batch_size,), generator=generator)
        return windows(self.val_tokens, starts, T)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # Resuming from a checkpoint restores global_step before this is called, so the stream picks up
        # at the batch where the interrupted run stopped.
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        rank = trainer.global_rank if trainer else 0
        tokens = self.train_tokens
        if trainer and self.hparams.tokens_on_gpu and trainer.strategy.root_device.type == "cuda":
            tokens = tokens.to(trainer.strategy.root_device)  # 1 byte per character: 1 MB for TinyShakespeare
        dataset = RandomWindows(tokens, self.hparams.block_size, self.hparams.batch_size, self.hparams.seed, rank, start)
        return DataLoader(dataset, batch_size=None)  # batches are made whole by the dataset; a gather needs no workers

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False)
