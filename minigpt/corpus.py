"""A text file or a folder of text files of any size, tokenized once into a memory-mapped token file.

The token file is the corpus's token ids end to end, in the smallest unsigned type that holds the vocabulary
(1, 2 or 4 bytes per token), next to the tokenizer (`meta.json` holds a character vocabulary, `tokenizer.json`
a BPE) in a cache folder. It is written once, streaming through the text in chunks, and reused while the
source's fingerprint (each file's path, size, times and inode, and the tokenizer settings) matches.
Nothing here holds more than a chunk of text or a batch of windows in memory.
"""

from __future__ import annotations

import codecs
import fcntl
import hashlib
import json
import logging
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from minigpt.atomic import atomic_write
from minigpt.tokenizer import SAFE_SPLIT, BPETokenizer, CharTokenizer, token_dtype

log = logging.getLogger(__name__)

FORMAT = 2  # part of the fingerprint: a change to how token files are written makes old ones stale (2: newlines)
TOKENIZERS = ("char", "bpe")  # or the path of a Hugging Face tokenizer.json


def tokenizer_file(tokenizer: str) -> Path | None:
    """The Hugging Face tokenizer.json that data.tokenizer names, or None for `char` and `bpe`."""
    if tokenizer in TOKENIZERS:
        return None
    file = Path(tokenizer).expanduser()
    if file.suffix != ".json" or not file.is_file():
        raise ValueError(
            f"data.tokenizer={tokenizer} is not one of {', '.join(TOKENIZERS)} nor the path of a Hugging Face "
            "tokenizer.json (e.g. GPT-2's, saved by tokenizers' Tokenizer.save or transformers' save_pretrained)"
        )
    return file


def source_files(path: str, glob: str) -> list[Path]:
    """The files of `path`: itself, or the files under it that match `glob`, hidden ones left out, sorted by path."""
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={path} does not exist. Give a UTF-8 text file or a folder of them.")
    files = sorted((p for p in root.glob(glob) if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if not files:
        raise FileNotFoundError(
            f"data.path={path} is a folder with no file matching data.glob={glob} (hidden files "
            "and folders are skipped). Pass data.glob='**/*' for every file in it and its "
            "subfolders, or point data.path at a file."
        )
    return files


def fingerprint(files: list[Path], settings: dict) -> str:
    """What the token file was made from, without reading the files: editing, adding, removing or touching a file
    changes it, and so does replacing one by a file of the same size and mtime (`cp -p`, `tar x`: a new inode or
    ctime)."""
    listing = [[str(f.resolve()), s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino] for f in files for s in [f.stat()]]
    blob = json.dumps({"format": FORMAT, "files": listing, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def last_safe_cut(text: str) -> int:
    """The end of the text's last `SAFE_SPLIT` point, or 0: where a chunk can end without changing a BPE token."""
    end = len(text)
    while (newline := text.rfind("\n", 0, end)) > 0:
        if newline + 1 < len(text) and not text[newline - 1].isspace() and not text[newline + 1].isspace():
            return newline + 1
        end = newline
    return 0


def not_text(file: Path, offset: int, reason: str, data: bytes, in_folder: bool = True) -> ValueError:
    """The error for a file that is not UTF-8 text, with what to do: `data` is what was read of it; `in_folder`:
    the file is one of a folder's (data=text), which data.glob can leave out, else the data.path itself."""
    converted = file.with_name(f"{file.stem}.utf8.txt")
    instead = "and leave the original out with data.glob" if in_folder else f"and pass data.path={converted}"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # what Windows' Notepad calls "Unicode"
        return ValueError(
            f"{file} is UTF-16 text, not UTF-8: convert it into a new file, e.g. `iconv -f utf-16 -t "
            f"utf-8 {file} > {converted}`, {instead}."
        )
    if b"\0" in data:  # no UTF-8 text has NUL bytes: an image, an archive, a program (or UTF-16 without its mark)
        leave_out = "leave it out, e.g. data.glob='**/*.txt' reads only a folder's .txt files"
        return ValueError(
            f"{file} is not UTF-8 text: it holds NUL bytes, as images, archives, programs and UTF-16 "
            f"text do. If it is UTF-16 text, convert it (`iconv -f utf-16 -t utf-8 {file} > "
            f"{converted}`); else {leave_out if in_folder else 'give a text file as data.path'}."
        )
    return ValueError(
        f"{file} is not UTF-8 text: byte {offset} ({reason}). If it is text in another encoding, convert it into a "
        f"new file, keeping the original: e.g. `iconv -f latin1 -t utf-8 {file} > {converted}` (`file {file}` "
        f"guesses its encoding; latin1 is one, cp1252 another), {instead}."
    )


def read_chunks(
    files: list[Path],
    chunk_bytes: int = 4 * 2**20,
    progress: tqdm | None = None,
    limit_bytes: int | None = None,
    in_folder: bool = True,
) -> Iterator[str]:
    """The files' text, one after the other, in pieces of about `chunk_bytes` bytes cut at `SAFE_SPLIT` points.

    Decoding is incremental, so a character split between two reads is joined up; a byte that is not UTF-8
    raises `not_text`'s error. Line endings read as Python reads a text file (\r\n and \r as \n) and a leading
    byte-order mark is dropped. Stops after `limit_bytes` bytes, if given.
    """
    read = 0
    for file in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        carry, offset, started = "", 0, False
        with file.open("rb") as f:
            while True:  # never past limit_bytes: a BPE trains on the first train_fraction of the bytes, no further
                data = f.read(chunk_bytes if limit_bytes is None else min(chunk_bytes, limit_bytes - read))
                pending = len(decoder.getstate()[0])  # bytes of a character the previous read cut in two
                try:
                    text = carry + decoder.decode(data, final=not data)
                except UnicodeDecodeError as err:
                    raise not_text(file, offset - pending + err.start, err.reason, data, in_folder) from None
                if not started and text:  # a byte-order mark, which some editors write first: not text
                    text, started = text.removeprefix("\ufeff"), True
                if "\0" in text:  # valid UTF-8, but no text: UTF-16 without its mark, or a binary file
                    raise not_text(file, offset, "", data, in_folder)
                offset += len(data)
                read += len(data)
                if progress is not None:
                    progress.update(len(data))
                done = not data or (limit_bytes is not None and read >= limit_bytes)
                # Windows' and old Macs' line endings read as newlines, as Python reads a text file; a \r that ends
                # a read waits for the next one, which may begin with its \n
                held = "\r" if text.endswith("\r") and not done else ""
                text = text[: len(text) - len(held)].replace("\r\n", "\n").replace("\r", "\n")
                # a line longer than a few chunks is cut where the read ended, so memory stays bounded
                cut = len(text) if done or len(text) > 4 * chunk_bytes else last_safe_cut(text)
                if cut:
                    yield text[:cut]
                carry = text[cut:] + held
                if done:
                    break
        if limit_bytes is not None and read >= limit_bytes:
            return


# This process's open token files, by (path, device, inode). A process started by fork (loader workers) inherits
# them; one started by spawn (DDP) opens the path again and checks it is still the same file.
_OPEN_FILES: dict[tuple[str, int, int], int] = {}


class TokenFileChanged(RuntimeError):
    """The token file a run reads was removed or replaced (its corpus re-tokenized) after the run started."""


RESUME_HINT = (
    "Resume the run (python train.py ckpt_path=<its run folder>, the same settings): it tokenizes the data "
    "as it is now, and is refused if the vocabulary changed; or restart the run without ckpt_path."
)


@dataclass(frozen=True)
class TokenFile:
    """Tokens `start` to `stop` of a token file, indexed like a 1-D CPU tensor of int64: `len()`, a slice, or a
    tensor of positions (what `windows` gathers with).

    Each read maps the file, copies out the tokens asked for and unmaps it: the pages a mapping has touched count
    as resident memory until it is unmapped, so one mapping kept for a run would grow to the whole file as random
    windows visit it. The pages stay in the page cache for the next reads; mapping anew costs 0.4-0.6 ms a batch on
    a 2-core CPU (benchmarks/corpus.py: 2.7x one long-lived mapping). The file stays open from `TokenFile.open` on,
    so a run goes on reading the file it started with when another run rebuilds it (renamed over the old one).
    Only the path, the file's identity and the span are held, so the object pickles small (for spawned processes).
    """

    path: Path
    dtype: np.dtype
    start: int
    stop: int
    identity: tuple[int, int]  # the file's (device, inode): which file at `path` this is

    device = torch.device("cpu")  # where the training stream draws its random starts

    @classmethod
    def open(cls, path: Path, dtype: np.dtype, n_tokens: int) -> TokenFile:
        """All the tokens of the file at `path`, which stays open in this process."""
        stat = os.stat(path)
        tokens = cls(path, np.dtype(dtype), 0, n_tokens, (stat.st_dev, stat.st_ino))
        tokens._descriptor()
        return tokens

    def _descriptor(self) -> int:
        key = (str(self.path), *self.identity)
        if key not in _OPEN_FILES:  # first use here, or a spawned process: the path must still be the same file
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except OSError as err:
                raise TokenFileChanged(
                    f"The token file {self.path} this run trains on is gone ({err.strerror}). {RESUME_HINT}"
                ) from None
            stat = os.fstat(fd)
            if (stat.st_dev, stat.st_ino) != self.identity:
                os.close(fd)
                raise TokenFileChanged(
                    f"The token file {self.path} was rebuilt after this run started (its source "
                    f"files changed). {RESUME_HINT}"
                )
            _OPEN_FILES[key] = fd
        return _OPEN_FILES[key]

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: slice | torch.Tensor) -> torch.Tensor:
        itemsize = self.dtype.itemsize
        first = self.start * itemsize
        aligned = first - first % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page boundary
        with mmap.mmap(
            self._descriptor(), self.stop * itemsize - aligned, access=mmap.ACCESS_READ, offset=aligned
        ) as mapped:
            tokens = np.frombuffer(mapped, self.dtype, count=len(self), offset=first - aligned)
            picked = tokens[index] if isinstance(index, slice) else tokens[torch.as_tensor(index).numpy()]
            picked = picked.astype(np.int64)  # a copy: the mapping closes here
            del tokens  # no view of the mapping may outlive it
        return torch.from_numpy(picked)

    def split(self, sections: list[int]) -> tuple[TokenFile, ...]:
        """Consecutive spans of these lengths, as `Tensor.split(sections)` gives views."""
        if sum(sections) != len(self):
            raise ValueError(f"sections {sections} do not add up to the {len(self)} tokens")
        ends = np.cumsum([0, *sections]) + self.start
        return tuple(
            TokenFile(self.path, self.dtype, int(a), int(b), self.identity) for a, b in zip(ends[:-1], ends[1:])
        )


@dataclass(frozen=True)
class Corpus:
    """A tokenized corpus: its token file and its tokenizer."""

    tokens: TokenFile
    tokenizer: CharTokenizer | BPETokenizer


def make_cache_folder(folder: Path) -> None:
    """Create `folder` in the cache, or say which setting names a cache this user cannot write."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"Permission denied: {folder}")
    except OSError as err:
        raise ValueError(
            f"The cache folder {folder} cannot be written ({err.strerror or err}): data.cache_dir (or the "
            "MINIGPT_CACHE_DIR variable) must name a folder this user can write, e.g. "
            "data.cache_dir=$HOME/.cache/minigpt"
        ) from None


def corpus_folder(cache_dir: str | Path, path: str, settings: dict) -> Path:
    """One cache folder per source and tokenizer settings: a changed source is rebuilt in place, not beside."""
    key = json.dumps({"path": str(Path(path).expanduser().resolve()), **settings}, sort_keys=True)
    name = Path(path).expanduser().resolve().name or "corpus"
    return Path(cache_dir).expanduser() / "corpora" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def load_corpus(folder: Path, expected_fingerprint: str) -> Corpus | None:
    """The corpus cached in `folder`, or None when there is none or it was made from something else."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != expected_fingerprint:
        return None
    tokens_file, dtype = folder / "tokens.bin", np.dtype(meta["dtype"])
    if not tokens_file.is_file() or tokens_file.stat().st_size != meta["n_tokens"] * dtype.itemsize:
        return None
    if meta["tokenizer"] == "char":
        tokenizer = CharTokenizer(meta["vocab"])
    else:  # a BPE trained here, or a tokenizer.json given
        tokenizer = BPETokenizer((folder / "tokenizer.json").read_text(encoding="utf-8"))
    return Corpus(TokenFile.open(tokens_file, dtype, meta["n_tokens"]), tokenizer)


def build_corpus(
    files: list[Path],
    folder: Path,
    tokenizer: str,
    vocab_size: int,
    bpe_train_bytes: int,
    train_fraction: float,
    chunk_bytes: int,
    fingerprint_: str,
) -> Corpus:
    """Tokenize `files` into `folder`: the tokenizer first, then the token file, then `meta.json` to mark it whole.

    A character vocabulary takes one pass over the text to collect its characters; a BPE learns its merges from
    the training text (the first `train_fraction` of the bytes), at most its first `bpe_train_bytes`. Then one
    pass encodes the text chunk by chunk into the token file.
    """
    total = sum(f.stat().st_size for f in files)
    if tokenizer == "char":
        chars: set[str] = set()
        with tqdm(total=total, unit="B", unit_scale=True, desc="collecting characters") as progress:
            for text in read_chunks(files, chunk_bytes, progress):
                chars.update(text)
        encoder: CharTokenizer | BPETokenizer = CharTokenizer("".join(sorted(chars)))
        extra = {"vocab": encoder.vocab}
    elif (file := tokenizer_file(tokenizer)) is not None:  # a user's tokenizer.json, used as it is
        encoder = BPETokenizer(file.read_text(encoding="utf-8"))
        extra = {"tokenizer_file": str(file.resolve())}
    else:
        train_bytes = min(int(total * train_fraction), bpe_train_bytes)
        log.info("Training a byte-level BPE of %d tokens on the first %d bytes of %d", vocab_size, train_bytes, total)
        lines = (
            line for text in read_chunks(files, chunk_bytes, limit_bytes=train_bytes) for line in SAFE_SPLIT.split(text)
        )
        encoder = BPETokenizer.train(lines, vocab_size)
        if encoder.vocab_size < vocab_size:
            log.warning(
                "The BPE learned %d tokens, not data.vocab_size=%d: %d bytes of training text hold no more "
                "pairs worth merging. A vocabulary that large for so little text memorises it; a smaller "
                "data.vocab_size (or the char tokenizer) suits it better",
                encoder.vocab_size,
                vocab_size,
                train_bytes,
            )
        extra = {}
    if isinstance(encoder, BPETokenizer):
        with atomic_write(folder / "tokenizer.json") as f:
            f.write(encoder.json.encode())
    dtype = token_dtype(encoder.vocab_size)
    n_tokens = 0
    with (
        atomic_write(folder / "tokens.bin") as out,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing to {dtype.name}") as progress,
    ):
        for text in read_chunks(files, chunk_bytes, progress):
            ids = encoder.encode(text).numpy().astype(dtype)
            out.write(ids.tobytes())
            n_tokens += len(ids)
    meta = {"fingerprint": fingerprint_, "tokenizer": tokenizer, "vocab_size": encoder.vocab_size, "dtype": dtype.name}
    meta |= {"n_tokens": n_tokens, "files": len(files), "bytes": total, **extra}
    with atomic_write(folder / "meta.json") as f:  # written last: a token file without it is never used
        f.write(json.dumps(meta, indent=1).encode())
    log.info("Wrote %d tokens (%s, %d bytes) to %s", n_tokens, dtype.name, n_tokens * dtype.itemsize, folder)
    return Corpus(TokenFile.open(folder / "tokens.bin", dtype, n_tokens), encoder)


def tokenize_corpus(
    path: str,
    cache_dir: str | Path,
    glob: str = "**/*.txt",
    tokenizer: str = "char",
    vocab_size: int = 4096,
    bpe_train_bytes: int = 100 * 2**20,
    train_fraction: float = 0.9,
    chunk_bytes: int = 4 * 2**20,
) -> Corpus:
    """The corpus at `path` (a file, or a folder's files matching `glob`), tokenized: from the cache when its
    fingerprint matches, else written now."""
    file = tokenizer_file(tokenizer)
    files = source_files(path, glob)
    settings = {"tokenizer": tokenizer, "glob": glob}
    if file is not None:  # its contents, not its name: an edited tokenizer.json tokenizes anew
        settings["tokenizer_sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    if tokenizer == "bpe":
        settings |= {"vocab_size": vocab_size, "bpe_train_bytes": bpe_train_bytes, "train_fraction": train_fraction}
    folder = corpus_folder(cache_dir, path, settings)
    current = fingerprint(files, settings)
    if (corpus := load_corpus(folder, current)) is not None:
        log.info("Using the token file in %s: the source is unchanged", folder)
        return corpus
    # Processes started by torchrun or SLURM would each tokenize (or wait): hours for a large corpus. Lightning
    # starts its own only after the first one has tokenized, in prepare_data.
    if (processes := int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)) > 1:
        raise ValueError(
            f"{path} has no token file for these data settings in {folder}, and this is one of {processes} "
            "processes started by torchrun or SLURM: tokenize it once before the job, with the same data settings: "
            f"python -m minigpt.prepare data=text data.path={path} data.tokenizer={tokenizer} [other data.* "
            "overrides, or experiment=...]"
        )
    make_cache_folder(folder)
    with open(folder / ".lock", "w") as lock:
        # two runs started together (or `minigpt.prepare` twice) would both tokenize: one does, the other reuses it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (corpus := load_corpus(folder, current)) is not None:
            return corpus
        log.info("Tokenizing %d file(s) of %s into %s", len(files), path, folder)
        return build_corpus(files, folder, tokenizer, vocab_size, bpe_train_bytes, train_fraction, chunk_bytes, current)
