"""Tokenize a corpus into train/val token shards plus `meta.json`.

Each document is preceded by <|endoftext|>, GPT-2's document separator. A document goes to the
validation split when the hash of its key says so (`sources.in_validation`), so the split does
not depend on order or on how many documents there are. The output directory appears only when
complete; an existing one is kept unless `overwrite` (a finished one with the same settings is
simply reused).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from modeconn import __version__
from modeconn import config as config_lib
from modeconn.atomic import atomic_dir
from modeconn.data import sources
from modeconn.data.shards import ShardWriter, read_header
from modeconn.data.tokenizer import EOT_ID, GPT2_VOCAB_SIZE, gpt2_tokenizer
from modeconn.errors import ConfigError, DataError
from modeconn.lock import lock_for_target

META_NAME = "meta.json"
SPLITS = ("train", "val")


@dataclass
class TokenizerConfig:
    bpe_file: Optional[str] = None  # local GPT-2 BPE file; else $MODECONN_GPT2_BPE, else tiktoken's download


@dataclass
class PrepareConfig:
    source: sources.SourceConfig = field(default_factory=sources.SourceConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    out_dir: str = "data/shakespeare"
    val_fraction: float = 0.05
    split_seed: int = 0
    shard_tokens: int = 100_000_000  # start a new shard after this many tokens
    workers: int = 0  # tokenizer threads; 0 = all cores
    batch_documents: int = 256  # documents tokenized per batch
    overwrite: bool = False

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1 or self.batch_documents < 1 or self.workers < 0:
            raise ConfigError("shard_tokens and batch_documents must be >= 1, workers >= 0")


# Keys that do not change the tokens written: a finished directory is reused whatever they say.
_NOT_OUTPUT_KEYS = ("workers", "batch_documents", "overwrite", "out_dir", "tokenizer")


def _output_settings(cfg: PrepareConfig) -> dict:
    d = config_lib.to_dict(cfg)
    return {k: v for k, v in d.items() if k not in _NOT_OUTPUT_KEYS}


class _SplitWriter:
    """Tokens of one split, rolled over into numbered shards of at most `shard_tokens`."""

    def __init__(self, out: Path, split: str, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
        self._writer: Optional[ShardWriter] = None

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._writer is None:
                self._writer = ShardWriter(self.out / f"{self.split}_{len(self.shards):06d}.bin")
            room = self.shard_tokens - self._writer.n_tokens
            self._writer.write(tokens[:room])
            tokens = tokens[room:]
            if self._writer.n_tokens >= self.shard_tokens:
                self._finish_shard()

    def _finish_shard(self) -> None:
        sha = self._writer.close()
        self.shards.append({"file": self._writer.path.name, "tokens": self._writer.n_tokens, "sha256": sha})
        self._writer = None

    def close(self) -> dict:
        if self._writer is not None and self._writer.n_tokens:
            self._finish_shard()
        elif self._writer is not None:
            self._writer.abort()
        return {"documents": self.documents, "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def prepare(cfg: PrepareConfig, progress: bool = True) -> Path:
    """Tokenize `cfg.source` into `cfg.out_dir`; returns the directory."""
    with lock_for_target(Path(cfg.out_dir), "prepare.py"):
        return _prepare(cfg, progress)


def _prepare(cfg: PrepareConfig, progress: bool) -> Path:
    out = Path(cfg.out_dir)
    if out.exists() and not (out / META_NAME).is_file() and not cfg.overwrite:
        raise DataError(f"{out} exists but is not a prepared token directory (no {META_NAME}); choose another "
                        f"out_dir (nothing there is overwritten)")
    if (out / META_NAME).is_file() and not cfg.overwrite:
        meta = read_meta(out)
        if meta.get("settings") == _output_settings(cfg):
            print(f"{out}: already prepared with these settings ({meta['splits']['train']['tokens']:,} train "
                  f"tokens); nothing to do")
            return out
        raise DataError(f"{out} already holds tokens prepared with other settings ({out / META_NAME}); "
                        f"choose another out_dir or pass --overwrite=true")

    enc = gpt2_tokenizer(cfg.tokenizer.bpe_file)
    if enc.n_vocab != GPT2_VOCAB_SIZE:
        raise DataError(f"tokenizer has {enc.n_vocab} tokens; GPT-2 has {GPT2_VOCAB_SIZE}")
    threads = cfg.workers or os.cpu_count() or 1
    start = time.perf_counter()
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        writers = {s: _SplitWriter(tmp, s, cfg.shard_tokens) for s in SPLITS}
        docs = sources.iter_documents(cfg.source)
        n_tokens = 0
        with tqdm(desc=f"tokenizing {cfg.source.kind}", unit=" docs", disable=not progress, mininterval=1.0,
                  delay=1.0) as bar:  # (delay: a source that fails at once leaves no bar before its error)
            while True:
                batch = [d for _, d in zip(range(cfg.batch_documents), docs)]
                if not batch:
                    break
                # tiktoken releases the GIL: a thread pool tokenizes in parallel without pickling.
                encoded = enc.encode_ordinary_batch([text for _, text in batch], num_threads=threads)
                for (key, _), ids in zip(batch, encoded):
                    split = "val" if sources.in_validation(key, cfg.val_fraction, cfg.split_seed) else "train"
                    writers[split].write(np.array([EOT_ID, *ids], dtype=np.uint32))
                    writers[split].documents += 1
                    n_tokens += len(ids) + 1
                bar.update(len(batch))
                bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - start):,.0f} tok/s", refresh=False)
        splits = {s: w.close() for s, w in writers.items()}
        for s in SPLITS:
            if splits[s]["tokens"] == 0:
                raise DataError(f"{sources.describe(cfg.source)} gave no {s} documents "
                                f"({sum(x['documents'] for x in splits.values())} documents in all); "
                                f"add documents or change val_fraction")
        elapsed = time.perf_counter() - start
        meta = {
            "format": "modeconn-tokens", "version": 1, "modeconn_version": __version__,
            "tokenizer": {"name": "gpt2", "n_vocab": enc.n_vocab, "eot_id": EOT_ID,
                          "bpe_file": cfg.tokenizer.bpe_file or os.environ.get("MODECONN_GPT2_BPE"),
                          "ranks_sha256": _ranks_digest(enc)},
            "source": sources.describe(cfg.source),
            "settings": _output_settings(cfg),
            "splits": splits,
            "tokens_per_second": round(n_tokens / elapsed),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
    print(f"{out}: {splits['train']['tokens']:,} train tokens ({splits['train']['documents']} docs), "
          f"{splits['val']['tokens']:,} val tokens ({splits['val']['documents']} docs) "
          f"in {elapsed:.1f} s ({n_tokens / elapsed:,.0f} tokens/s)")
    return out


def _ranks_digest(enc) -> str:
    """Identifies the BPE table, so shards made with different tokenizers are never mixed."""
    h = hashlib.sha256()
    for i in range(EOT_ID):
        h.update(enc.decode_single_token_bytes(i))
    return h.hexdigest()


def read_meta(data_dir: Path) -> dict:
    """`meta.json` of a prepared directory, with each listed shard's header checked against it."""
    data_dir = Path(data_dir)
    path = data_dir / META_NAME
    if not path.is_file():
        raise DataError(f"{data_dir} is not a prepared token directory (no {META_NAME}); run prepare.py first")
    try:
        meta = json.loads(path.read_text())
        splits = meta["splits"]
        for split in splits.values():
            for shard in split["shards"]:
                n = read_header(data_dir / shard["file"])
                if n != shard["tokens"]:
                    raise DataError(f"{data_dir / shard['file']} holds {n} tokens, {path} says {shard['tokens']}")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a valid token metadata file ({type(e).__name__}: {e})") from None
    return meta


def main(argv=None) -> None:
    cfg = config_lib.from_cli(PrepareConfig, argv, __doc__)
    prepare(cfg)

