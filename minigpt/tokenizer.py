"""Tokenizers: characters (the lesson's), or a byte-level BPE trained locally with Hugging Face `tokenizers`.

Both encode a string to a 1-D tensor of ids and decode ids back, and both describe themselves as a plain
hyper-parameter (`hparams()`: the character vocabulary, or the BPE's JSON), which is how a checkpoint carries
its tokenizer and how `tokenizer_from_hparams` rebuilds it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import torch

BYTES = 256  # a byte-level BPE starts from every byte value, so any text encodes
# Where a byte-level BPE's pre-tokenizer (GPT-2's pattern) splits anyway: between a line ending in a non-space and
# a line starting with one. Cutting a text there changes no token, so long texts are encoded line by line in
# parallel, and a corpus is read in chunks cut there.
SAFE_SPLIT = re.compile(r"(?<=\S\n)(?=\S)")


def unescape(text: str) -> str:
    r"""Text given on the command line, with `\n` and `\t` read as a newline and a tab: Hydra passes them on as a
    backslash and a letter, and a real newline is awkward to type. `python sample.py 'prompt=\n'` starts a line."""
    return re.sub(r"\\[nt]", lambda escape: "\n" if escape[0] == "\\n" else "\t", text)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds ids 0 .. vocab_size - 1: the token file's bytes per token."""
    return np.min_scalar_type(max(vocab_size - 1, 0))


class CharTokenizer:
    """Maps each distinct character of a text to an integer: its rank in sorted order."""

    def __init__(self, vocab: str):
        if vocab != "".join(sorted(set(vocab))):
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
        """The smallest type that holds every id: signed above 256, as PyTorch indexes with few unsigned types."""
        if self.vocab_size <= 256:
            return torch.uint8
        return torch.int16 if self.vocab_size <= 2**15 else torch.int32

    def hparams(self) -> dict[str, str]:
        return {"vocab": self.vocab}

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of `text` as a 1-D tensor of `self.dtype`; unknown characters raise a ValueError naming them."""
        if not text:
            return torch.empty(0, dtype=self.dtype)  # torch.frombuffer refuses an empty buffer
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

    def pieces(self, ids: torch.Tensor | list[int]) -> list[str]:
        """The text of each token, e.g. to label the axes of an attention map."""
        return list(self.decode(ids))


class BPETokenizer:
    """A byte-level BPE (GPT-2's scheme): any UTF-8 text encodes, and decoding gives back the exact text.

    Trained here, or any Hugging Face tokenizer.json whose pre-tokenizer splits at line ends as GPT-2's does.
    """

    def __init__(self, json: str):
        from tokenizers import Tokenizer  # imported here: character-level runs do not need the library

        self.json = json
        self._tokenizer = Tokenizer.from_str(json)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> BPETokenizer:
        """Learn merges from `texts` on this machine (nothing is downloaded) until there are `vocab_size` tokens."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size <= BYTES:
            raise ValueError(
                f"data.vocab_size={vocab_size} is too small for a byte-level BPE: its first {BYTES} "
                f"tokens are the byte values, so give at least {BYTES + 1} (e.g. 4096)."
            )
        tokenizer = Tokenizer(models.BPE())
        # no prefix space: a text is split and rejoined exactly, so decode(encode(text)) == text
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer.to_str())

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def hparams(self) -> dict[str, str]:
        return {"bpe": self.json}

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of `text` as a 1-D int64 tensor, its lines encoded in parallel by the library's threads."""
        # _fast: without character offsets, which are never used; no special tokens: a given tokenizer.json may add
        # some (a BOS) to each sequence, and here a sequence is a line
        encodings = self._tokenizer.encode_batch_fast(SAFE_SPLIT.split(text), add_special_tokens=False)
        return torch.from_numpy(np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64))

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return self._tokenizer.decode(torch.as_tensor(ids).tolist())

    def pieces(self, ids: torch.Tensor | list[int]) -> list[str]:
        """The text of each token; a token holding part of a multi-byte character shows as U+FFFD."""
        return [self._tokenizer.decode([i]) for i in torch.as_tensor(ids).tolist()]


def tokenizer_from_hparams(vocab: str | None = None, bpe: str | None = None) -> CharTokenizer | BPETokenizer:
    """The tokenizer a checkpoint describes: a character vocabulary, or a BPE's JSON."""
    if (vocab is None) == (bpe is None):
        raise ValueError("give exactly one of vocab (a character vocabulary) and bpe (a BPE tokenizer's JSON)")
    return CharTokenizer(vocab) if bpe is None else BPETokenizer(bpe)
