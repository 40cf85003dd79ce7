from __future__ import annotations

import hashlib

import pytest
import torch

from minigpt.data import CharTokenizer, RandomWindows, TextDataModule, resolve_text_file, windows


def test_tokenizer_round_trip():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = CharTokenizer.from_text(text)
    assert tok.vocab == "".join(sorted(set(text)))
    ids = tok.encode(text)
    assert ids.dtype == torch.uint8  # a compact stream: one byte per character
    assert tok.decode(ids) == text


def test_tokenizer_names_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"'z'.*'é'|'é'.*'z'"):
        tok.encode("abzé")


def test_tokenizer_picks_a_wider_type_for_large_vocabularies():
    tok = CharTokenizer("".join(chr(c) for c in range(1000, 1300)))
    assert tok.dtype == torch.int16
    assert tok.decode(tok.encode(tok.vocab)) == tok.vocab


def test_windows_targets_are_inputs_shifted_by_one():
    tokens = torch.arange(100, dtype=torch.uint8)
    x, y = windows(tokens, torch.tensor([0, 10, 83]), block_size=16)
    assert x.shape == y.shape == (3, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x[1], torch.arange(10, 26))
    assert torch.equal(y[2], torch.arange(84, 100))  # the last window ends on the last token


def test_split_is_disjoint_and_ninety_ten(text_file):
    dm = TextDataModule(path=str(text_file), block_size=16, batch_size=4)
    dm.setup()
    text = text_file.read_text()
    assert len(dm.train_tokens) == int(0.9 * len(text))
    assert len(dm.train_tokens) + len(dm.val_tokens) == len(text)
    # the validation split is exactly the tail: no character of it is in the training split
    assert dm.tokenizer.decode(dm.val_tokens) == text[len(dm.train_tokens) :]
    x, y = dm.val_set.tensors
    assert x.shape == (dm.hparams.val_batches * 4, 16)


def test_validation_windows_are_the_same_whatever_the_training_seed_and_whole_split_option(text_file):
    def windows(**seeds):
        dm = TextDataModule(path=str(text_file), block_size=16, batch_size=4, **seeds)
        dm.setup()
        return dm.val_set.tensors[0]

    assert torch.equal(windows(seed=1), windows(seed=2))  # so val/loss compares across runs of any seed
    assert not torch.equal(windows(seed=1), windows(seed=1, val_seed=2))
    whole = TextDataModule(path=str(text_file), block_size=16, batch_size=4, val_batches=None)
    whole.setup()
    x, _ = whole.val_set.tensors
    assert len(x) == (len(whole.val_tokens) - 1) // 16  # non-overlapping windows covering the split
    assert torch.equal(x.flatten(), whole.val_tokens[: x.numel()].long())


def _first_batches(tokens, seed, rank=0, start=0, n=3):
    it = iter(RandomWindows(tokens, block_size=8, batch_size=4, seed=seed, rank=rank, start=start))
    return [next(it) for _ in range(n)]


def test_batches_are_reproducible_from_the_seed_and_resumable():
    tokens = torch.randint(50, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    first, again = _first_batches(tokens, seed=7), _first_batches(tokens, seed=7)
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first[0][0], first[1][0])  # consecutive batches differ
    assert not torch.equal(first[0][0], _first_batches(tokens, seed=8)[0][0])
    assert not torch.equal(first[0][0], _first_batches(tokens, seed=7, rank=1)[0][0])  # DDP ranks differ
    resumed = _first_batches(tokens, seed=7, start=2, n=1)  # starting at batch 2 gives batch 2
    assert torch.equal(resumed[0][0], first[2][0])


def test_data_comes_from_cache_then_verified_download(tmp_path, text_file):
    payload = text_file.read_bytes()
    sha = hashlib.sha256(payload).hexdigest()
    cache_file = tmp_path / "cache" / "corpus" / "input.txt"
    # "Downloaded" through urllib from a file:// URL: the same code path as https, without a network
    got = resolve_text_file(None, cache_file, text_file.as_uri(), sha)
    assert got == cache_file and cache_file.read_bytes() == payload
    assert [p.name for p in cache_file.parent.iterdir()] == ["input.txt"]  # no temporary file left behind
    # a second call uses the cache even when the URL is gone
    assert resolve_text_file(None, cache_file, (tmp_path / "gone.txt").as_uri(), sha) == cache_file


def test_download_with_wrong_checksum_writes_nothing(tmp_path, text_file):
    cache_file = tmp_path / "cache" / "input.txt"
    with pytest.raises(ValueError, match="sha256"):
        resolve_text_file(None, cache_file, text_file.as_uri(), "0" * 64)
    assert not cache_file.exists()


def test_missing_data_says_where_to_put_it(tmp_path):
    cache_file = tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    url = (tmp_path / "offline" / "input.txt").as_uri()  # fails like a machine without network
    with pytest.raises(FileNotFoundError) as err:
        resolve_text_file(None, cache_file, url, None)
    message = str(err.value)
    assert str(cache_file) in message and url in message and "data.path=" in message


def test_cached_file_with_wrong_checksum_is_kept_and_explained(tmp_path):
    cache_file = tmp_path / "tinyshakespeare" / "input.txt"
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text("not shakespeare")
    with pytest.raises(ValueError, match="Delete it to download it again"):
        resolve_text_file(None, cache_file, "https://example.invalid/input.txt", "0" * 64)
    assert cache_file.read_text() == "not shakespeare"  # nothing the user had is deleted


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"path": "{tmp}"},
            r"data.path=.* is a folder: data=text reads a folder's files .* python train.py data=text "
            r"data.path=",
        ),
        (
            {"train_fraction": 1},
            r"data.train_fraction is the share of the text that trains, the rest validating: above "
            r"0 and below 1 \(0.9 by default\), got 1",
        ),
    ],
)
def test_settings_the_text_module_cannot_take_say_what_they_mean(tmp_path, text_file, settings, message):
    settings = {
        "path": str(text_file),
        **{k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in settings.items()},
    }
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        TextDataModule(block_size=16, **settings).setup()


def test_windows_line_endings_are_read_as_newlines(tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"To be,\r\nor not to be:\r\n" * 20)
    dm = TextDataModule(path=str(tmp_path / "crlf.txt"), block_size=16)
    dm.setup()
    assert "\r" not in dm.tokenizer.decode(dm.train_tokens) and "be,\nor" in dm.tokenizer.decode(dm.train_tokens)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "too short"),
        (b"abc" * 10, "too short"),
        (b"\xff\xfe bad bytes" * 100, "not UTF-8"),
        (b"\x1f\x8b\x08\0\0\0" * 100, "it holds NUL bytes.*give a text file as data.path"),  # a .gz
        (
            b"\xff oops" * 10,
            r"keeping the original: .* > \S*corpus.utf8.txt` .*, and pass data.path=\S*corpus.utf8.txt",
        ),
    ],
)
def test_bad_text_files_get_clear_errors(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        TextDataModule(path=str(path), block_size=16).setup()
