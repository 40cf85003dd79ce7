"""A text file or folder of any size as a memory-mapped token file: data=text, char or BPE tokens."""

from __future__ import annotations

import logging
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import minigpt.corpus as corpus
import train
from minigpt.corpus import TokenFile, read_chunks, tokenize_corpus
from minigpt.data import CorpusDataModule, RandomWindows, TextDataModule, windows
from minigpt.inspect import inspect
from minigpt.resume import check_resumable
from minigpt.tokenizer import BPETokenizer, CharTokenizer, token_dtype
from tests.helpers import TINY, compose_train, make_text, run_python
from tests.test_inspect import compose_inspect


@pytest.fixture
def folder(tmp_path) -> Path:
    """A corpus in two files, one in a subfolder, beside files that are not part of it."""
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text(make_text(60, seed=1), encoding="utf-8")
    (root / "b" / "c.txt").write_text("naïve café, ĉu vi? ✓\n" + make_text(60, seed=2), encoding="utf-8")
    (root / "notes.md").write_text("not matched by the default glob")
    (root / ".hidden.txt").write_text("hidden files are skipped")
    return root


def corpus_text(folder: Path) -> str:
    return (folder / "a.txt").read_text(encoding="utf-8") + (folder / "b" / "c.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "vocab_size, dtype", [(65, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)]
)
def test_token_dtype_is_the_smallest_unsigned_type_that_holds_the_vocabulary(vocab_size, dtype):
    assert token_dtype(vocab_size) == dtype


def test_a_folder_round_trips_through_the_token_file(folder, tmp_path):
    # 7-byte reads cut multi-byte characters in two: the incremental decoder must join them up
    got = tokenize_corpus(str(folder), tmp_path / "cache", chunk_bytes=7)
    assert isinstance(got.tokenizer, CharTokenizer) and got.tokens.dtype == np.uint8
    assert got.tokenizer.decode(got.tokens[:]) == corpus_text(folder)  # sorted order: a.txt, then b/c.txt
    assert got.tokens.path.stat().st_size == len(got.tokens)  # one byte per token
    assert not list(got.tokens.path.parent.glob(".*.part"))  # no temporary file left behind


def test_a_single_file_and_a_wide_vocabulary(tmp_path):
    text = "".join(chr(c) for c in range(0x400, 0x400 + 300)) * 3  # 300 distinct characters: two bytes a token
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    got = tokenize_corpus(str(tmp_path / "wide.txt"), tmp_path / "cache", glob="ignored for a file")
    assert got.tokens.dtype == np.uint16 and got.tokenizer.vocab_size == 300
    assert got.tokenizer.decode(got.tokens[:]) == text


def test_the_token_file_is_reused_until_a_file_changes(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = tokenize_corpus(str(folder), cache)
    written = first.tokens.path.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a token file whose source had not changed")

    with monkeypatch.context() as patch:
        patch.setattr(corpus, "build_corpus", no_rebuild)
        again = tokenize_corpus(str(folder), cache)
    assert again.tokens == first.tokens and first.tokens.path.stat().st_mtime_ns == written

    changed = folder / "b" / "c.txt"
    changed.write_text(changed.read_text(encoding="utf-8") + "ZEBRA\n", encoding="utf-8")
    rebuilt = tokenize_corpus(str(folder), cache)
    assert rebuilt.tokens.path == first.tokens.path  # rebuilt in place, not beside
    assert len(rebuilt.tokens) == len(first.tokens) + 6 and "Z" in rebuilt.tokenizer.vocab
    assert rebuilt.tokenizer.decode(rebuilt.tokens[-6:]) == "ZEBRA\n"

    os.utime(folder / "a.txt", ns=(0, 0))  # the same bytes, touched: rebuilt, since contents are never read to check
    with monkeypatch.context() as patch:
        patch.setattr(corpus, "build_corpus", no_rebuild)
        with pytest.raises(AssertionError, match="rebuilt"):
            tokenize_corpus(str(folder), cache)

    # replaced by another text of the same size and modification time, as `cp -p` or `tar x` replace a file
    before = tokenize_corpus(str(folder), cache)
    original = folder / "a.txt"
    stat = original.stat()
    replacement = folder / "a.new"
    replacement.write_text(original.read_text(encoding="utf-8").swapcase(), encoding="utf-8")
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, original)
    assert (original.stat().st_size, original.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = tokenize_corpus(str(folder), cache)
    assert after.tokenizer.decode(after.tokens[:]) != before.tokenizer.decode(before.tokens[:])  # the new text


def test_a_run_keeps_reading_its_token_file_when_another_rebuilds_it(folder, tmp_path, monkeypatch):
    """The corpus edited while a run trains on it: the next run rebuilds the token file in place, and the running
    one goes on reading the tokens it started with. A process the running one starts later opens the file by its
    path: that one is told the file changed under it, instead of reading other tokens with the old vocabulary."""
    import pickle

    cache = tmp_path / "cache"
    running = tokenize_corpus(str(folder), cache)
    before = running.tokens[:]
    train_part, _ = running.tokens.split([len(before) - 10, 10])
    (folder / "a.txt").write_text("Q\n", encoding="utf-8")  # shorter, and a character the vocabulary lacked
    rebuilt = tokenize_corpus(str(folder), cache)
    assert rebuilt.tokens.path == running.tokens.path and len(rebuilt.tokens) < len(before)
    assert torch.equal(running.tokens[:], before)
    assert torch.equal(train_part[torch.tensor([0, 7, len(before) - 11])], before[[0, 7, len(before) - 11]])

    sent = pickle.loads(pickle.dumps(train_part))  # as a spawned process gets it: no open file there yet
    monkeypatch.setattr(corpus, "_OPEN_FILES", {})
    with pytest.raises(corpus.TokenFileChanged, match="was rebuilt after this run started .* restart the run"):
        sent[torch.tensor([0])]


def test_a_bpe_vocabulary_the_text_cannot_fill_is_warned_about(folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        got = tokenize_corpus(str(folder), tmp_path / "cache", tokenizer="bpe", vocab_size=60000)
    assert f"The BPE learned {got.tokenizer.vocab_size} tokens, not data.vocab_size=60000" in caplog.text


def test_bpe_is_trained_locally_and_round_trips(folder, tmp_path):
    got = tokenize_corpus(str(folder), tmp_path / "cache", tokenizer="bpe", vocab_size=300)
    assert isinstance(got.tokenizer, BPETokenizer) and got.tokens.dtype == np.uint16
    assert 256 < got.tokenizer.vocab_size <= 300
    text = corpus_text(folder)
    assert got.tokenizer.decode(got.tokens[:]) == text
    assert len(got.tokens) < len(text.encode())  # merges make tokens longer than a byte
    saved = got.tokens.path.parent / "tokenizer.json"
    again = BPETokenizer(saved.read_text(encoding="utf-8"))
    assert again.encode("naïve café ✓").tolist() == got.tokenizer.encode("naïve café ✓").tolist()
    assert (
        again.decode(again.encode("any text at all: 日本語")) == "any text at all: 日本語"
    )  # bytes, so nothing is unknown


def test_cutting_a_text_into_chunks_changes_no_bpe_token(tmp_path):
    text = make_text(200) + "trailing  \n  spaces\n\n\nand blank lines\n\t\nX\n"
    file = tmp_path / "t.txt"
    file.write_text(text, encoding="utf-8")
    tokenizer = BPETokenizer.train([text], vocab_size=400, show_progress=False)
    chunks = list(read_chunks([file], chunk_bytes=50))
    assert len(chunks) > 10 and "".join(chunks) == text
    assert torch.equal(torch.cat([tokenizer.encode(c) for c in chunks]), tokenizer.encode(text))


def test_line_endings_and_a_byte_order_mark_read_as_python_reads_text_wherever_the_reads_are_cut(tmp_path):
    rng = random.Random(0)
    for _ in range(200):
        pieces = ["a", "é", "日", " ", "\n", "\r", "\r\n", "x\r\ny"]
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        mark = rng.choice([b"", b"\xef\xbb\xbf"])
        (tmp_path / "t.txt").write_bytes(mark + text.encode())
        as_python_reads_it = (tmp_path / "t.txt").read_text(encoding="utf-8-sig")  # universal newlines
        for chunk_bytes in (1, 2, 3, 64):
            assert "".join(read_chunks([tmp_path / "t.txt"], chunk_bytes)) == as_python_reads_it, (text, chunk_bytes)


def test_both_data_modules_read_a_windows_text_file_alike(tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"\xef\xbb\xbfTo be,\r\nor not to be:\r\n" * 30)
    one_file = TextDataModule(path=str(tmp_path / "crlf.txt"), block_size=16)
    any_corpus = CorpusDataModule(path=str(tmp_path / "crlf.txt"), cache_dir=str(tmp_path / "cache"), block_size=16)
    for module in (one_file, any_corpus):
        module.setup()
    assert one_file.tokenizer.vocab == any_corpus.tokenizer.vocab and "\r" not in one_file.tokenizer.vocab
    assert torch.equal(one_file.train_tokens.long(), any_corpus.train_tokens[:].long())


@pytest.mark.parametrize("limit", [1, 49, 50, 51, 333])
def test_a_limited_read_stops_at_the_limit_and_never_in_the_text_after_it(tmp_path, limit):
    text = make_text(40).replace("e", "é").replace("\n", "\r\n")  # two-byte characters, Windows' line endings
    (tmp_path / "a.txt").write_text(text[:200], encoding="utf-8", newline="")
    (tmp_path / "b.txt").write_text(text[200:], encoding="utf-8", newline="")  # the limit falls in the second too
    read = "".join(read_chunks([tmp_path / "a.txt", tmp_path / "b.txt"], chunk_bytes=50, limit_bytes=limit))
    head = text.encode()[:limit].decode("utf-8", errors="ignore")  # a character cut in two is left out
    assert read == head.replace("\r\n", "\n").replace("\r", "\n")


def test_windows_from_the_token_file_are_those_of_the_tokens_in_memory(folder, tmp_path):
    got = tokenize_corpus(str(folder), tmp_path / "cache")
    in_memory = got.tokenizer.encode(corpus_text(folder))
    starts = torch.tensor([0, 5, len(in_memory) - 17])
    for a, b in zip(windows(got.tokens, starts, 16), windows(in_memory, starts, 16)):
        assert torch.equal(a, b)
    x, y = windows(got.tokens, starts, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one

    def batches(tokens, rank=0, start=0, n=3):
        stream = iter(RandomWindows(tokens, block_size=16, batch_size=4, seed=7, rank=rank, start=start))
        return [next(stream) for _ in range(n)]

    from_file, from_memory = batches(got.tokens), batches(in_memory)
    for (x1, y1), (x2, y2) in zip(from_file, from_memory):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)  # the same seeding: reproducible, resumable, per rank
    assert torch.equal(batches(got.tokens, start=2, n=1)[0][0], from_file[2][0])
    assert not torch.equal(batches(got.tokens, rank=1, n=1)[0][0], from_file[0][0])


def test_the_data_module_never_holds_the_corpus_in_memory(folder, tmp_path):
    dm = CorpusDataModule(
        path=str(folder), cache_dir=str(tmp_path / "cache"), block_size=16, batch_size=4, val_batches=2
    )
    dm.prepare_data()
    dm.setup("fit")
    assert isinstance(dm.train_tokens, TokenFile) and isinstance(dm.val_tokens, TokenFile)
    n = len(dm.train_tokens) + len(dm.val_tokens)
    assert len(dm.train_tokens) == int(0.9 * n)  # the last 10% of the tokens validate
    assert dm.val_tokens.start == dm.train_tokens.stop
    assert len(pickle.dumps(dm.train_tokens)) < 1000  # a path and a span, whatever the corpus's size
    x, y = dm.val_set.tensors
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # each target window is its input shifted by one token
    for seeds, same in [({"seed": 2}, True), ({"val_seed": 2}, False)]:  # the validation's own seed picks them
        other = CorpusDataModule(
            path=str(folder), cache_dir=str(tmp_path / "cache"), block_size=16, batch_size=4, val_batches=2, **seeds
        )
        other.setup("fit")
        assert torch.equal(other.val_set.tensors[0], x) == same
    stream = iter(dm.train_dataloader())
    assert next(stream)[0].shape == (4, 16)


def test_a_cache_that_cannot_be_written_or_is_empty_is_named_not_taken_for_a_failed_download(
    tmp_path, text_file, monkeypatch
):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(
        ValueError,
        match=r"cache folder .*a_file/corpora/.* cannot be written .*data.cache_dir "
        r"\(or the MINIGPT_CACHE_DIR variable\) must name a folder this user can "
        r"write",
    ):
        CorpusDataModule(path=str(text_file), cache_dir=str(tmp_path / "a_file"), block_size=16).setup()
    tinyshakespeare = TextDataModule(cache_dir=str(tmp_path / "a_file"), url="http://127.0.0.1:9/input.txt")
    with pytest.raises(ValueError, match=r"cache folder .*a_file/tinyshakespeare cannot be written"):
        tinyshakespeare.prepare_data()  # not "could not be downloaded ... copy it to <a path inside a file>"
    monkeypatch.setattr(corpus.os, "access", lambda path, mode: False)  # a folder this user may not write
    with pytest.raises(ValueError, match=r"cache folder .*cache/corpora/.* cannot be written \(Permission denied"):
        CorpusDataModule(path=str(text_file), cache_dir=str(tmp_path / "cache"), block_size=16).setup()
    for module in (CorpusDataModule, TextDataModule):  # MINIGPT_CACHE_DIR= (set, but to nothing)
        with pytest.raises(ValueError, match=r"data.cache_dir is empty \(is the MINIGPT_CACHE_DIR variable set to"):
            module(path=str(text_file), cache_dir="")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: root, "no file matching"),  # an empty folder
        (lambda root: (root / "short.txt").write_text("abc" * 5) and root, "15 tokens: too short for block_size=16"),
        (
            lambda root: (root / "x.txt").write_bytes(b"fine text\n" * 3 + b"\xff oops") and root,  # never overwrite it
            r"x.txt is not UTF-8 text: byte 30\b.* keeping the original: e.g. "
            r"`iconv -f latin1 -t utf-8 \S*corpus/x.txt > "
            r"\S*corpus/x.utf8.txt` .* leave the original out with data.glob",
        ),
        (
            lambda root: (root / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR") and root / "a.png",
            r"a.png is not UTF-8 text: it holds NUL bytes, as images.*data.glob='\*\*/\*.txt'",
        ),
        (
            lambda root: (root / "u.txt").write_bytes("Notepad's Unicode\n".encode("utf-16")) and root,
            r"u.txt is UTF-16 text, not UTF-8: .*iconv -f utf-16 -t utf-8",
        ),
        (
            lambda root: (
                (root / "u.txt").write_bytes("no mark\n".encode("utf-16-le")) and root
            ),  # valid UTF-8, with NULs
            r"u.txt is not UTF-8 text: it holds NUL bytes",
        ),
    ],
)
def test_bad_sources_get_clear_errors(tmp_path, make, message):
    root = tmp_path / "corpus"
    root.mkdir()
    dm = CorpusDataModule(path=str(make(root)), cache_dir=str(tmp_path / "cache"), block_size=16)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        dm.setup()


def test_bad_settings_get_clear_errors(folder, tmp_path):
    with pytest.raises(ValueError, match="at least 257"):
        tokenize_corpus(str(folder), tmp_path / "cache", tokenizer="bpe", vocab_size=256)
    with pytest.raises(ValueError, match="data.tokenizer=words is not one of char, bpe"):
        tokenize_corpus(str(folder), tmp_path / "cache", tokenizer="words")
    with pytest.raises(ValueError, match="give a UTF-8 text file or a folder"):
        CorpusDataModule(path="")


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_train_and_sample_on_a_folder(tokenizer, folder, tmp_path):
    """The whole path: train.py data=text on a folder, then sample.py decodes from the checkpoint alone."""
    cfg = compose_train(
        TINY
        + [
            "data=text",
            f"data.path={folder}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"data.tokenizer={tokenizer}",
            "data.vocab_size=300",
            "trainer.max_steps=10",
            f"data.num_workers={int(tokenizer == 'char')}",  # and through a loader worker
            "trainer.val_check_interval=10",
        ],
        run_dir=tmp_path / "run",
    )
    metrics = train.train(cfg)
    assert metrics["step"] == 10 and np.isfinite(metrics["val/loss"])
    assert (
        len(list((tmp_path / "run").glob("attention_layer*.png"))) == 2
    )  # labelled with the tokens (tiny has 2 layers)
    # python -m minigpt.inspect on the same data: the gradient table of a validation batch
    inspect_cfg = compose_inspect(
        [
            f"ckpt_path={tmp_path / 'run'}",
            "what=grads",
            "data=text",
            f"data.path={folder}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"data.tokenizer={tokenizer}",
            "data.vocab_size=300",
            f"out_dir={tmp_path / 'inspect'}",
        ]
    )
    assert [p.name for p in inspect(inspect_cfg)] == ["gradient_flow.png"]
    # sampling needs nothing but the checkpoint: the token file and its tokenizer are gone
    for file in (tmp_path / "cache").rglob("*"):
        if file.is_file():
            file.unlink()
    out = run_python("sample.py", f"ckpt_path={tmp_path / 'run'}", "prompt=KING:", "max_new_tokens=20")
    assert out.stdout.startswith("KING:") and len(out.stdout) > len("KING:")


def test_resuming_with_another_tokenizer_is_refused(tmp_path):
    from minigpt.module import MiniGPTModule

    sizes = dict(n_layer=1, n_head=1, n_embd=8, block_size=8)
    bpe = BPETokenizer.train([make_text(50)], vocab_size=260, show_progress=False)
    module = MiniGPTModule(bpe=bpe.json, model=sizes)
    assert module.model.config.vocab_size == bpe.vocab_size
    char_checkpoint = {"hyper_parameters": {"vocab": "abc", "model": sizes}}
    with pytest.raises(ValueError, match=r"another tokenizer \(characters\) .* \(a byte-level BPE\)"):
        check_resumable(char_checkpoint, module, tmp_path / "last.ckpt")


def test_processes_started_together_tokenize_once(folder, tmp_path, monkeypatch):
    """DDP ranks launched at once (torchrun, SLURM) share one token file: the first writes it, the others wait."""
    import threading

    builds = []
    build = corpus.build_corpus
    monkeypatch.setattr(corpus, "build_corpus", lambda *args: builds.append(1) or build(*args))
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(tokenize_corpus(str(folder), tmp_path / "cache")))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(results) == 3 and len({r.tokens for r in results}) == 1


def test_loader_workers_give_the_same_stream(folder, tmp_path):
    """With workers reading ahead, batch i is still batch i: the same run with or without them."""

    def first_batches(num_workers: int, n: int = 5) -> list[torch.Tensor]:
        dm = CorpusDataModule(
            path=str(folder), cache_dir=str(tmp_path / "cache"), block_size=16, batch_size=4, num_workers=num_workers
        )
        dm.setup()
        stream = iter(dm.train_dataloader())
        return [next(stream)[0] for _ in range(n)]

    for a, b in zip(first_batches(0), first_batches(2)):
        assert torch.equal(a, b)


def test_a_sample_prompt_outside_the_corpus_is_refused_before_training(tmp_path):
    (tmp_path / "lower.txt").write_text("all in lower case, with no capitals at all.\n" * 40)
    overrides = ["data=text", f"data.path={tmp_path / 'lower.txt'}", f"data.cache_dir={tmp_path}"]
    cfg = compose_train(TINY + overrides, run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=r"callbacks.text_samples.prompt='ROMEO:' cannot be encoded: .*'R'"):
        train.train(cfg)
    assert not list((tmp_path / "run").rglob("*.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["data=text"], "error: data=text reads data.path: give a UTF-8 text file or a folder"),
        (["data=text", "data.path=/nonexistent/corpus"], "error: data.path=/nonexistent/corpus does not exist"),
    ],
)
def test_the_command_line_names_what_is_missing(args, message, tmp_path):
    out = run_python("train.py", *args, "trainer=cpu", f"hydra.run.dir={tmp_path}", check=False)
    assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr
