"""Tokenizer, token shards and the prepare command."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

from modeconn.data import sources, tokenizer
from modeconn.data.prepare import PrepareConfig, TokenizerConfig, prepare, read_meta
from modeconn.data.shards import HEADER_BYTES, ShardWriter, open_shard, read_header, shard_sha256, write_shard
from modeconn.data.tokenizer import EOT_ID, gpt2_tokenizer
from modeconn.errors import DataError


# --- tokenizer ---------------------------------------------------------------------------------

def test_known_token_ids(bpe_file):
    enc = gpt2_tokenizer(bpe_file)
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_ID]
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_tokenizer_from_environment(monkeypatch, bpe_file):
    monkeypatch.setenv(tokenizer.BPE_ENV_VAR, bpe_file)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail("must not download"))
    assert gpt2_tokenizer().encode_ordinary("Hello world") == [15496, 995]


def test_no_tokenizer_names_both_fixes(monkeypatch):
    monkeypatch.delenv(tokenizer.BPE_ENV_VAR, raising=False)

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError) as e:
        gpt2_tokenizer()
    assert "MODECONN_GPT2_BPE" in str(e.value) and "tokenizer.bpe_file" in str(e.value)
    assert "network" in str(e.value)


def test_foreign_bpe_file(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("not a bpe file\n")
    with pytest.raises(DataError, match="vocab.txt"):
        gpt2_tokenizer(str(bad))
    with pytest.raises(DataError, match="does not exist"):
        gpt2_tokenizer(str(tmp_path / "missing.tiktoken"))


# --- shards --------------------------------------------------------------------------------------

def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 10_001)
    sha = write_shard(tmp_path / "a.bin", tokens)
    assert (tmp_path / "a.bin").stat().st_size == HEADER_BYTES + 2 * tokens.size
    back = open_shard(tmp_path / "a.bin")
    assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    assert shard_sha256(tmp_path / "a.bin") == sha
    write_shard(tmp_path / "empty.bin", np.zeros(0, dtype=np.int64))
    assert len(open_shard(tmp_path / "empty.bin")) == 0


def test_corrupt_shards_name_the_file(tmp_path):
    write_shard(tmp_path / "good.bin", np.arange(1000))
    data = (tmp_path / "good.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"cut\.bin is truncated.*1000 tokens"):
        open_shard(tmp_path / "cut.bin")
    (tmp_path / "foreign.bin").write_bytes(np.arange(600, dtype=np.uint16).tobytes())
    with pytest.raises(DataError, match=r"foreign\.bin is not a modeconn token shard"):
        read_header(tmp_path / "foreign.bin")
    (tmp_path / "tiny.bin").write_bytes(b"MC")
    with pytest.raises(DataError, match=r"tiny\.bin is not a modeconn token shard"):
        read_header(tmp_path / "tiny.bin")
    future = bytearray(data)
    future[8] = 9  # version field
    (tmp_path / "future.bin").write_bytes(bytes(future))
    with pytest.raises(DataError, match=r"future\.bin: shard format version 9"):
        read_header(tmp_path / "future.bin")
    with pytest.raises(DataError, match="fit in uint16"):
        write_shard(tmp_path / "big.bin", np.array([70000]))
    assert not list(tmp_path.glob(".big.bin*")) and not (tmp_path / "big.bin").exists()


def test_unfinished_shard_is_invisible(tmp_path):
    w = ShardWriter(tmp_path / "s.bin")
    w.write(np.arange(10))
    assert not (tmp_path / "s.bin").exists()  # only the temporary exists until close()
    w.close()
    assert np.array_equal(open_shard(tmp_path / "s.bin"), np.arange(10))


# --- prepare -------------------------------------------------------------------------------------

def all_tokens(data_dir, split):
    meta = read_meta(data_dir)
    return np.concatenate([open_shard(data_dir / s["file"]) for s in meta["splits"][split]["shards"]])


def test_shakespeare_prepared(shakespeare, bpe_file):
    meta = read_meta(shakespeare)
    docs = list(sources.iter_documents(sources.SourceConfig()))
    assert len(docs) > 700 and len({k for k, _ in docs}) == len(docs)  # one document per scene, unique keys
    enc = gpt2_tokenizer(bpe_file)
    for split in ("train", "val"):
        tokens = all_tokens(shakespeare, split)
        info = meta["splits"][split]
        assert tokens.size == info["tokens"]
        assert np.count_nonzero(tokens == EOT_ID) == info["documents"]  # one separator per document
        assert tokens[0] == EOT_ID
        for shard in info["shards"]:
            assert shard_sha256(shakespeare / shard["file"]) == shard["sha256"]
    val_keys = [k for k, _ in docs if sources.in_validation(k, 0.05, 0)]
    assert meta["splits"]["val"]["documents"] == len(val_keys) > 10
    assert meta["splits"]["train"]["documents"] + len(val_keys) == len(docs)
    # The val split holds exactly the val documents, in corpus order.
    val_text = enc.decode(all_tokens(shakespeare, "val").tolist())
    expected = "".join("<|endoftext|>" + t for k, t in docs if sources.in_validation(k, 0.05, 0))
    assert val_text == expected
    assert "ROMEO:" in enc.decode(all_tokens(shakespeare, "train")[:2_000_000].tolist())


def test_prepare_is_deterministic_whatever_the_parallelism(tmp_path, shakespeare, bpe_file):
    cfg = PrepareConfig(out_dir=str(tmp_path / "again"), workers=1, batch_documents=7, shard_tokens=400_000,
                        tokenizer=TokenizerConfig(bpe_file=bpe_file))
    prepare(cfg, progress=False)
    for split in ("train", "val"):
        assert np.array_equal(all_tokens(tmp_path / "again", split), all_tokens(shakespeare, split))
    assert len(read_meta(tmp_path / "again")["splits"]["train"]["shards"]) == 4  # rolled over at 400k tokens


def test_prepare_keeps_what_exists(tmp_path, bpe_file):
    cfg = PrepareConfig(source=sources.SourceConfig(max_documents=40), out_dir=str(tmp_path / "d"),
                        val_fraction=0.2, tokenizer=TokenizerConfig(bpe_file=bpe_file))
    prepare(cfg, progress=False)
    meta_before = (tmp_path / "d" / "meta.json").read_text()
    prepare(cfg, progress=False)  # same settings: reused
    changed = PrepareConfig(**{**cfg.__dict__, "val_fraction": 0.3})
    with pytest.raises(DataError, match="already holds tokens prepared with other settings"):
        prepare(changed, progress=False)
    assert (tmp_path / "d" / "meta.json").read_text() == meta_before
    prepare(PrepareConfig(**{**changed.__dict__, "overwrite": True}), progress=False)
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["settings"]["val_fraction"] == 0.3


def test_failed_prepare_leaves_nothing(tmp_path, monkeypatch, bpe_file):
    def broken(cfg):
        yield "doc-0", "some text " * 50
        raise OSError("disk went away")

    monkeypatch.setattr(sources, "_shakespeare", broken)
    with pytest.raises(OSError):
        prepare(PrepareConfig(out_dir=str(tmp_path / "d"), batch_documents=1,
                              tokenizer=TokenizerConfig(bpe_file=bpe_file)), progress=False)
    assert list(tmp_path.iterdir()) == []


TEXTS = [(f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i + 1)).strip() for i in range(40)]


def expected_tokens(enc, texts):
    return sum(len(enc.encode_ordinary(t)) + 1 for t in texts)


def prepare_files(tmp_path, bpe_file, out_name, **source):
    cfg = PrepareConfig(source=sources.SourceConfig(**source), out_dir=str(tmp_path / out_name), val_fraction=0.25,
                        tokenizer=TokenizerConfig(bpe_file=bpe_file))
    meta = read_meta(prepare(cfg, progress=False))
    return meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"], meta


def test_local_text_jsonl_parquet_and_hub_loader_agree(tmp_path, bpe_file):
    enc = gpt2_tokenizer(bpe_file)
    src = tmp_path / "src"
    (src / "txt").mkdir(parents=True)
    for i, t in enumerate(TEXTS):
        (src / "txt" / f"{i:03d}.txt").write_text(t)
    (src / "one.md").write_text("\n\n".join(TEXTS))
    (src / "docs.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    pq.write_table(pa.table({"content": TEXTS}), src / "docs.parquet")
    # A directory laid out like a hub dataset repository; `datasets.load_dataset(name)` reads it.
    (src / "hub" / "data").mkdir(parents=True)
    (src / "hub" / "data" / "train.jsonl").write_text((src / "docs.jsonl").read_text())

    n = expected_tokens(enc, TEXTS)
    assert prepare_files(tmp_path, bpe_file, "txt", kind="files", paths=[str(src / "txt" / "*.txt")])[0] == n
    assert prepare_files(tmp_path, bpe_file, "md", kind="files", paths=[str(src / "one.md")],
                         text_documents="paragraph")[0] == n
    assert prepare_files(tmp_path, bpe_file, "jsonl", kind="files", paths=[str(src / "docs.jsonl")])[0] == n
    assert prepare_files(tmp_path, bpe_file, "parquet", kind="files", paths=[str(src / "docs.parquet")],
                         text_field="content")[0] == n
    total, meta = prepare_files(tmp_path, bpe_file, "hub", kind="hub", name=str(src / "hub"), split="train")
    assert total == n and meta["splits"]["val"]["documents"] > 0


def test_bad_sources(tmp_path, bpe_file):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"docs\.jsonl: row 0 has no field 'text'; fields: body"):
        prepare_files(tmp_path, bpe_file, "o1", kind="files", paths=[str(tmp_path / "docs.jsonl")])
    with pytest.raises(DataError, match="matches no file"):
        prepare_files(tmp_path, bpe_file, "o2", kind="files", paths=[str(tmp_path / "*.txt")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: unsupported file type"):
        prepare_files(tmp_path, bpe_file, "o3", kind="files", paths=[str(tmp_path / "x.csv")])
    with pytest.raises(DataError, match="cannot load hub dataset"):
        prepare_files(tmp_path, bpe_file, "o4", kind="hub", name=str(tmp_path / "no-such-dataset"))
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(DataError, match="gave no val documents|gave no train documents"):
        prepare_files(tmp_path, bpe_file, "o5", kind="files", paths=[str(tmp_path / "one.txt")])
    assert not (tmp_path / "o5").exists()
