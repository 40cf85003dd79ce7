"""A corpus larger than memory: tokenizing it once, then drawing random windows with flat resident memory.

Generates a corpus of `--tokens` characters (TinyShakespeare's lines, reshuffled, in `--files` files) in a
temporary folder, tokenizes it with data=text's code (char tokens: one byte each), then draws `--batches`
batches of random windows from the token file for each batch shape of the project's models, sampling the
process's resident memory (/proc/self/status) as it goes. The same draws through one long-lived np.memmap show
what the per-read mapping of `TokenFile` avoids. Window-loading rates are compared with the training step's
needs (benchmarks/RESULTS.md). Everything generated is deleted at the end; results go to RESULTS.md.

    python benchmarks/corpus.py                     # 200 M tokens: ~0.4 GB on disk while it runs, a few minutes
    python benchmarks/corpus.py --tokens 20000000   # a quick look
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import append_results, machine_summary  # noqa: E402
from minigpt.corpus import TokenFile, tokenize_corpus  # noqa: E402
from minigpt.data import RandomWindows, batch_seed  # noqa: E402

MiB = 2**20
SEED = 1337
# Training steps' appetite for tokens, measured by benchmarks/throughput.py (benchmarks/RESULTS.md): the fastest
# numbers there, on a GPU, are the hardest for a data loader to keep up with.
STEP_NEEDS = {  # (model, batch, block): (tokens/s, where measured)
    ("seed", 32, 128): (682_690, "H200, compiled with CUDA graphs"),
    ("small", 64, 256): (2_020_929, "H200, compiled, plain loop"),
}


def memory() -> dict[str, int]:
    """Resident memory of this process in bytes: all of it (VmRSS), its own (RssAnon), mapped files (RssFile)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024  # reported in kB
    return fields


def generate(folder: Path, n_chars: int, n_files: int, source: Path, seed: int = 0) -> int:
    """TinyShakespeare's lines in random orders, into `n_files` files of about n_chars / n_files characters."""
    lines = np.array(source.read_text(encoding="utf-8").splitlines(keepends=True), dtype=object)
    rng = np.random.default_rng(seed)
    written = 0
    for i in range(n_files):
        target = n_chars * (i + 1) // n_files
        with (folder / f"part{i:03d}.txt").open("w", encoding="utf-8") as f:
            while written < target:
                text = "".join(lines[rng.permutation(len(lines))])[: target - written]
                f.write(text)
                written += len(text)
    return written


def draw(tokens, batch: int, block: int, n_batches: int, every: int) -> tuple[list[float], list[dict]]:
    """Seconds per block of `every` batches, and memory before and after each block (VmHWM: the peak so far)."""
    stream = iter(RandomWindows(tokens, block, batch, seed=SEED))
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current resident memory
    seconds, samples = [], [memory()]
    for _ in range(n_batches // every):
        begin = time.perf_counter()
        for _ in range(every):
            next(stream)
        seconds.append(time.perf_counter() - begin)
        samples.append(memory())
    return seconds, samples


def pages_visited(tokens: TokenFile, batch: int, block: int, n_batches: int) -> float:
    """The share of the token file's 4 KiB pages that the windows of `draw` read: their starts drawn again."""
    generator, high = torch.Generator(), len(tokens) - block
    starts = []
    for i in range(n_batches):
        generator.manual_seed(batch_seed(SEED, 0, i))
        starts.append(torch.randint(high, (batch,), generator=generator).numpy())
    first = np.concatenate(starts) * tokens.dtype.itemsize // 4096
    last = (np.concatenate(starts) + block) * tokens.dtype.itemsize // 4096
    return len(np.unique(np.concatenate([first, last]))) / -(-tokens.path.stat().st_size // 4096)


class LongLivedMap:
    """One np.memmap kept for the whole run, indexed like TokenFile: the naive design, for comparison."""

    def __init__(self, tokens: TokenFile):
        self.map = np.memmap(
            tokens.path, dtype=tokens.dtype, mode="r", offset=tokens.start * tokens.dtype.itemsize, shape=(len(tokens),)
        )
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.map)

    def __getitem__(self, offsets: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.map[offsets.numpy()].astype(np.int64))


def mb(n: float) -> str:
    return f"{n / MiB:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200_000_000, help="corpus size in characters (= char tokens)")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4000, help="batches drawn per batch shape and variant")
    parser.add_argument("--every", type=int, default=200, help="batches between memory samples (a timing block)")
    parser.add_argument("--source", default=str(Path("~/.cache/minigpt/tinyshakespeare/input.txt").expanduser()))
    parser.add_argument(
        "--bpe-mb",
        type=int,
        default=0,
        help="also tokenize this many MiB of the corpus with data.tokenizer=bpe (vocab_size 4096)",
    )
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the corpus and token file are written")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()

    free = shutil.disk_usage(args.tmp).free
    if free < 3 * args.tokens:  # the text, its tokens, and room to spare
        raise SystemExit(
            f"error: {args.tmp} has {mb(free)} free; the benchmark needs about {mb(3 * args.tokens)}. "
            "Pass --tmp on a larger disk, or fewer --tokens."
        )
    work = Path(tempfile.mkdtemp(prefix="minigpt-corpus-", dir=args.tmp))
    try:
        (work / "corpus").mkdir()
        begin = time.perf_counter()
        n_chars = generate(work / "corpus", args.tokens, args.files, Path(args.source))
        generated = time.perf_counter() - begin
        before = memory()
        begin = time.perf_counter()
        corpus = tokenize_corpus(str(work / "corpus"), work / "cache")
        tokenized = time.perf_counter() - begin
        after = memory()
        tokens = corpus.tokens
        assert len(tokens) == n_chars, (len(tokens), n_chars)

        bpe_line = ""
        if args.bpe_mb:
            (work / "bpe").mkdir()
            with (work / "corpus" / "part000.txt").open("rb") as f:
                (work / "bpe" / "part.txt").write_bytes(f.read(args.bpe_mb * MiB).rpartition(b"\n")[0] + b"\n")
            begin = time.perf_counter()
            bpe = tokenize_corpus(str(work / "bpe"), work / "cache", tokenizer="bpe", vocab_size=4096)
            seconds = time.perf_counter() - begin
            size = (work / "bpe" / "part.txt").stat().st_size
            bpe_line = (
                f"\n\nBPE (data.tokenizer=bpe, vocab_size 4096, trained on the first 90%) on the first "
                f"{mb(size)} of it: {seconds:.1f} s to train and encode, {len(bpe.tokens) / seconds / 1e6:.2f} M "
                f"tokens/s, {size / len(bpe.tokens):.2f} bytes per token, token file {bpe.tokens.dtype.name}."
            )

        rows, memory_rows = [], []
        for (model, batch, block), (need, where) in STEP_NEEDS.items():
            for name, source in (
                ("TokenFile (maps per read)", tokens),
                ("one long-lived np.memmap", LongLivedMap(tokens)),
            ):
                seconds, samples = draw(source, batch, block, args.batches, args.every)
                batches_per_s = args.every / statistics.median(seconds)
                pages = pages_visited(tokens, batch, block, args.batches)
                rows.append(
                    f"| {model} | {batch} x {block} | {name} | {batches_per_s:,.0f} | "
                    f"{batches_per_s * batch * block / 1e6:,.1f} M | {batches_per_s * batch * block / need:,.0f}x "
                    f"({need / 1e6:.2f} M, {where}) |"
                )
                rss = [s["VmRSS"] for s in samples]
                memory_rows.append(
                    f"| {model} | {name} | {mb(rss[0])} | {mb(rss[-1])} | {mb(max(rss))} | "
                    f"{mb(samples[-1]['VmHWM'])} | "
                    f"{mb(samples[-1]['RssAnon'] - samples[0]['RssAnon'])} | "
                    f"{mb(samples[-1]['RssFile'] - samples[0]['RssFile'])} | {pages:.0%} |"
                )
        body = "\n".join(
            [
                f"Corpus: {n_chars:,} characters of TinyShakespeare lines reshuffled into {args.files} files "
                f"(generated in {generated:.0f} s); char tokenizer, vocabulary of {corpus.tokenizer.vocab_size}, "
                f"token file {tokens.dtype.name}, {mb(tokens.path.stat().st_size)}.",
                "",
                f"Tokenizing (two passes: collect the characters, then encode; 4 MiB chunks): {tokenized:.1f} s, "
                f"{n_chars / tokenized / 1e6:.1f} M tokens/s; peak resident memory of the process "
                f"{mb(after['VmHWM'])} (before: {mb(before['VmRSS'])} resident).{bpe_line}",
                "",
                f"Random windows, {args.batches} batches per row, timed in blocks of {args.every}; medians over blocks "
                "(other jobs shared this machine's cores, so rates are noisy):",
                "",
                "| model | batch x block | reader | batches/s | tokens/s | vs the step's need |",
                "|---|---|---|---|---|---|",
                *rows,
                "",
                f"Resident memory while drawing (VmRSS at the start, the end and the largest of the samples taken "
                "every "
                f"{args.every} batches; VmHWM, the peak at any moment, within a read too; growth of the process's own "
                "memory, RssAnon, and of mapped file pages, RssFile; share of the token file's 4 KiB pages the windows "
                "read):",
                "",
                "| model | reader | VmRSS start | end | max sampled | peak | RssAnon growth | RssFile growth "
                "| pages visited |",
                "|---|---|---|---|---|---|---|---|---|",
                *memory_rows,
            ]
        )
        print(body)
        append_results(
            args.results,
            f"Corpus larger than memory: {n_chars / 1e6:.0f} M tokens, token file and random windows",
            " ".join(["python", *sys.argv]),
            machine_summary("cpu"),
            body,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
