"""Tokenize a corpus once, before training: python -m minigpt.prepare data=text data.path=/data/corpus [overrides]

Takes train.py's overrides (the data ones matter; `experiment=pretrain` brings its data settings) and writes the
token file train.py reads, in the same cache folder, with progress bars. Run it before a job of several processes
(torchrun, SLURM), which refuses to tokenize by itself; rerun, it finds the token file and says so.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir

from minigpt import schema
from minigpt.data import CorpusDataModule

CONF = Path(__file__).resolve().parents[1] / "conf"
log = logging.getLogger("minigpt.prepare")


def prepare(overrides: list[str]) -> CorpusDataModule:
    """The data module of train.py's config with `overrides`, its corpus tokenized (or found in the cache)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    schema.check(cfg, schema.Train)
    if not cfg.data._target_.endswith("CorpusDataModule"):
        raise ValueError("minigpt.prepare tokenizes data=text corpora: give data=text data.path=<file or folder>")
    datamodule: CorpusDataModule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    return datamodule


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return
    try:
        datamodule = prepare(argv)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    tokens = datamodule.train_tokens
    log.info(
        "Ready: %s, %d training and %d validation tokens, vocabulary of %d. Train with: python train.py %s",
        tokens.path.parent,
        len(tokens),
        len(datamodule.val_tokens),
        datamodule.tokenizer.vocab_size,
        " ".join(argv),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
