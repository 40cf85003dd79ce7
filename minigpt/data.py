"""Text, tokenizer and batches of random windows, as LightningDataModules: a text held in memory (TinyShakespeare),
or a corpus of any size read from a memory-mapped token file (minigpt/corpus.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, get_worker_info

from minigpt.atomic import atomic_write
from minigpt.corpus import Corpus, TokenFile, make_cache_folder, read_chunks, tokenize_corpus
from minigpt.tokenizer import BPETokenizer, CharTokenizer

log = logging.getLogger(__name__)

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CACHE_DIR = os.environ.get("MINIGPT_CACHE_DIR", "~/.cache/minigpt")  # as conf/data/*.yaml's cache_dir


def download(url: str, dest: Path, sha256: str | None) -> None:
    """Fetch `url` to `dest` atomically: the file appears complete and verified, or not at all."""
    log.info("Downloading %s to %s", url, dest)
    with urllib.request.urlopen(url, timeout=30) as response:
        payload = response.read()
    digest = hashlib.sha256(payload).hexdigest()
    if sha256 and digest != sha256:
        raise ValueError(
            f"Download from {url} has sha256 {digest}, expected {sha256}; nothing was written. "
            "Check data.url and data.sha256 (data.sha256=null accepts any file)."
        )
    with atomic_write(dest) as f:  # readers never see a half-written file
        f.write(payload)


def resolve_text_file(path: str | None, cache_file: Path, url: str | None, sha256: str | None) -> Path:
    """Where the text comes from: `path` if given, else the cache, else a verified download into the cache."""
    if path is not None:
        file = Path(path).expanduser()
        if file.is_dir():
            raise FileNotFoundError(
                f"data.path={path} is a folder: data=text reads a folder's files (data.glob picks "
                f"them, **/*.txt by default): python train.py data=text data.path={path}"
            )
        if not file.is_file():
            raise FileNotFoundError(
                f"data.path={path} does not exist or is not a file. Give the path of a UTF-8 text file."
            )
        return file
    if cache_file.is_file():
        if sha256 and (digest := hashlib.sha256(cache_file.read_bytes()).hexdigest()) != sha256:
            raise ValueError(
                f"The cached data file {cache_file} has sha256 {digest}, expected {sha256}: it is damaged or a "
                f"different file. Delete it to download it again from {url}, or pass data.path={cache_file} to "
                "train on it as your own corpus."
            )
        return cache_file
    if url is None:
        raise FileNotFoundError(f"No data file: {cache_file} does not exist and no data.url is set to fetch it from.")
    make_cache_folder(cache_file.parent)  # an unwritable cache is not a failed download
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


def windows(
    tokens: torch.Tensor | TokenFile, starts: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for windows starting at `starts`: x = tokens[i:i+T], y = tokens[i+1:i+T+1]."""
    offsets = starts[:, None] + torch.arange(block_size + 1, device=starts.device)  # (B, T+1)
    chunk = tokens[offsets].long()  # one gather for the whole batch, no Python loop per sample
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()  # (B, T), (B, T)


def batch_seed(seed: int, rank: int, index: int) -> int:
    """A seed for one batch, mixed by a hash: the CPU generator uses only the low 32 bits of its seed."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(eq=False)
class RandomWindows(IterableDataset):
    """An endless stream of batches of random windows, from a tensor or a token file.

    Batch `i` is drawn from a generator seeded with (seed, rank, i) alone, so a run resumed at batch `i`
    sees exactly the batches an uninterrupted run would, and each DDP rank sees different windows. In a
    DataLoader with n workers, worker k makes batches start + k, start + k + n, ...: the loader takes them from
    the workers in turn, so the stream is the same as without workers.
    """

    tokens: torch.Tensor | TokenFile
    block_size: int
    batch_size: int
    seed: int
    rank: int = 0
    start: int = 0

    def __iter__(self):
        device = self.tokens.device  # on a GPU the windows are drawn and gathered there: no copy per batch
        generator = torch.Generator(device)
        high = len(self.tokens) - self.block_size  # the last start whose target still fits
        worker = get_worker_info()
        i, step = (self.start + worker.id, worker.num_workers) if worker else (self.start, 1)
        while True:
            generator.manual_seed(batch_seed(self.seed, self.rank, i))
            starts = torch.randint(high, (self.batch_size,), generator=generator, device=device)
            yield windows(self.tokens, starts, self.block_size)
            i += step


def check_settings(block_size: int, batch_size: int, train_fraction: float, val_batches: int | None, cache_dir: str):
    """The ranges no type states (minigpt/schema.py checks the types)."""
    if batch_size <= 0 or block_size <= 0:
        raise ValueError(
            f"data.batch_size and data.block_size must be positive whole numbers, got {batch_size} and {block_size}"
        )
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(
            f"data.train_fraction is the share of the text that trains, the rest validating: above 0 "
            f"and below 1 (0.9 by default), got {train_fraction!r}"
        )
    if val_batches is not None and val_batches <= 0:
        raise ValueError(
            f"data.val_batches must be a positive whole number, or null for the whole split, got {val_batches}"
        )
    if not cache_dir:  # a MINIGPT_CACHE_DIR that is set to nothing would put the cache in the working directory
        raise ValueError(
            "data.cache_dir is empty (is the MINIGPT_CACHE_DIR variable set to nothing?): name the folder "
            "for downloads and token files, e.g. data.cache_dir=$HOME/.cache/minigpt, or unset "
            "MINIGPT_CACHE_DIR"
        )


class WindowsDataModule(L.LightningDataModule):
    """Random training windows and fixed validation windows of a token stream split in two; a subclass's `setup`
    sets `tokenizer`, `train_tokens` and `val_tokens` through `split`.

    The validation set is a fixed set of windows, the same at every validation, so `val/loss` is comparable
    across steps and runs.
    """

    def __init__(self):
        super().__init__()
        self.tokenizer: CharTokenizer | BPETokenizer | None = None

    def split(
        self, tokens: torch.Tensor | TokenFile, tokenizer: CharTokenizer | BPETokenizer, source: Path | str, unit: str
    ):
        """The first `train_fraction` of `tokens` trains, the rest validates; each must hold one window."""
        hp = self.hparams
        n_train = int(len(tokens) * hp.train_fraction)
        if min(n_train, len(tokens) - n_train) < hp.block_size + 1:
            needed = int((hp.block_size + 1) / min(hp.train_fraction, 1 - hp.train_fraction)) + 1
            raise ValueError(
                f"{source} has {len(tokens)} {unit}: too short for block_size={hp.block_size}. Each split needs "
                f"block_size + 1 {unit}, so at least {needed} in all. Use a longer text or a smaller model.block_size."
            )
        self.train_tokens, self.val_tokens = tokens.split([n_train, len(tokens) - n_train])  # views, not copies
        self.val_set = TensorDataset(*self._validation_windows())
        # What identifies the text, for a checkpoint: a text edited in place, with the same characters, passes every
        # check of the settings, so the validation split's first million tokens are hashed too.
        head = self.val_tokens[: 2**20].long().numpy().tobytes()
        self._text_record = {
            "train_tokens": n_train,
            "val_tokens": len(self.val_tokens),
            "val_head_sha256": hashlib.sha256(head).hexdigest(),
        }
        self.tokenizer = tokenizer
        log.info(
            "%s: %d %s, vocabulary of %d, %d for training and %d for validation",
            source,
            len(tokens),
            unit,
            tokenizer.vocab_size,
            n_train,
            len(self.val_tokens),
        )

    def text_record(self) -> dict[str, int | str]:
        return self._text_record

    def state_dict(self) -> dict[str, Any]:  # saved in checkpoints by Lightning
        return {"text": self.text_record()} if self.tokenizer is not None else {}

    def _validation_windows(self) -> tuple[torch.Tensor, torch.Tensor]:
        hp, T = self.hparams, self.hparams.block_size
        if hp.val_batches is None:  # the whole split, in non-overlapping windows
            starts = torch.arange(0, len(self.val_tokens) - T, T)
        else:  # a fixed sample, drawn by a generator of its own: the same windows whatever the training seed
            generator = torch.Generator().manual_seed(hp.val_seed)
            starts = torch.randint(len(self.val_tokens) - T, (hp.val_batches * hp.batch_size,), generator=generator)
        return windows(self.val_tokens, starts, T)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # Resuming from a checkpoint restores global_step before this is called, so the stream picks up
        # at the batch where the interrupted run stopped.
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        rank = trainer.global_rank if trainer else 0
        tokens, hp = self.train_tokens, self.hparams
        # (a token file stays on disk: only a text held in memory has the tokens_on_gpu setting)
        if trainer and hp.get("tokens_on_gpu") and trainer.strategy.root_device.type == "cuda":
            tokens = tokens.to(trainer.strategy.root_device)  # 1 byte per character: 1 MB for TinyShakespeare
        dataset = RandomWindows(tokens, hp.block_size, hp.batch_size, hp.seed, rank, start)
        # Batches are made whole by the dataset. From memory, a gather needs no workers; from a token file, workers
        # read the next batches while the model trains on this one.
        return DataLoader(dataset, batch_size=None, num_workers=hp.get("num_workers", 0))

    def val_dataloader(self) -> DataLoader:
        trainer, sampler = self.trainer, None
        if trainer is not None and 1 < trainer.world_size <= len(self.val_set):
            # Under DDP each rank validates its share of the windows, each window once: Lightning's default sampler
            # would pad the shares to equal length by repeating windows, and val/loss would weigh those twice.
            sampler = UnrepeatedDistributedSampler(
                self.val_set, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, sampler=sampler, shuffle=False)


class TextDataModule(WindowsDataModule):
    """One text file, held in memory, tokenized by character: TinyShakespeare, downloaded on first use."""

    def __init__(
        self,
        path: str | None = None,
        name: str = "tinyshakespeare",
        url: str | None = TINYSHAKESPEARE_URL,
        sha256: str | None = TINYSHAKESPEARE_SHA256,
        cache_dir: str = CACHE_DIR,
        block_size: int = 128,
        batch_size: int = 32,
        train_fraction: float = 0.9,
        val_batches: int | None = 10,
        seed: int = 1337,
        val_seed: int = 1337,
        tokens_on_gpu: bool = True,
    ):
        super().__init__()
        check_settings(block_size, batch_size, train_fraction, val_batches, cache_dir)
        self.save_hyperparameters()
        self.cache_file = Path(cache_dir).expanduser() / name / (Path(url).name if url else "input.txt")

    def prepare_data(self) -> None:
        resolve_text_file(self.hparams.path, self.cache_file, self.hparams.url, self.hparams.sha256)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:  # train.py sets up early to read the vocabulary; the Trainer calls again
            return
        hp = self.hparams
        file = resolve_text_file(hp.path, self.cache_file, hp.url, hp.sha256)
        text = "".join(read_chunks([file], in_folder=False))  # as data=text reads it: \r\n as \n, no byte-order mark
        tokenizer = CharTokenizer.from_text(text)
        self.split(tokenizer.encode(text), tokenizer, file, "characters")  # uint8 up to 256 characters: 1 byte each


class CorpusDataModule(WindowsDataModule):
    """A text file or a folder of text files of any size, tokenized once into a memory-mapped token file.

    Memory does not grow with the corpus: tokenizing streams through the text in chunks, and training windows
    are read from the token file batch by batch (see `minigpt.corpus.TokenFile`).
    """

    def __init__(
        self,
        path: str | None = None,
        glob: str = "**/*.txt",
        tokenizer: str = "char",
        vocab_size: int = 4096,
        bpe_train_bytes: int = 100 * 2**20,
        cache_dir: str = CACHE_DIR,
        block_size: int = 128,
        batch_size: int = 32,
        train_fraction: float = 0.9,
        val_batches: int | None = 10,
        seed: int = 1337,
        val_seed: int = 1337,
        num_workers: int = 0,
        tokens_per_step: int | None = None,  # the global batch in tokens: train.py derives accumulation from it
    ):
        super().__init__()
        if not path:
            raise ValueError(
                "data=text reads data.path: give a UTF-8 text file or a folder of them, e.g. data.path=/data/my_corpus"
            )
        check_settings(block_size, batch_size, train_fraction, val_batches, cache_dir)
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        self._tokenize()  # written here once (on each node's first process); later calls find it in the cache

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:  # train.py sets up early to read the vocabulary; the Trainer calls again
            return
        corpus = self._tokenize()
        self.split(corpus.tokens, corpus.tokenizer, self.hparams.path, "tokens")

    def _tokenize(self) -> Corpus:
        hp = self.hparams
        return tokenize_corpus(
            hp.path, hp.cache_dir, hp.glob, hp.tokenizer, hp.vocab_size, hp.bpe_train_bytes, hp.train_fraction
        )
