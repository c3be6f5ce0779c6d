import os
from pathlib import Path

import numpy as np
import pytest

from modeconn.data.prepare import PrepareConfig, TokenizerConfig, prepare
from modeconn.data.shards import write_shard

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def bpe_file() -> str:
    path = os.environ.get("MODECONN_GPT2_BPE") or str(ROOT.parent / "shared" / "data" / "gpt2.tiktoken")
    assert Path(path).is_file(), f"tests need the GPT-2 BPE file: set MODECONN_GPT2_BPE (tried {path})"
    return path


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory, bpe_file) -> Path:
    """The embedded corpus, prepared once for the whole session."""
    out = tmp_path_factory.mktemp("data") / "shakespeare"
    return prepare(PrepareConfig(out_dir=str(out), tokenizer=TokenizerConfig(bpe_file=bpe_file)), progress=False)


def write_token_dir(out: Path, splits: dict[str, list[np.ndarray]]) -> Path:
    """A prepared directory from given token arrays (one shard each), bypassing the tokenizer."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "modeconn-tokens", "version": 1, "splits": {}}
    for split, arrays in splits.items():
        shards = []
        for i, a in enumerate(arrays):
            name = f"{split}_{i:06d}.bin"
            shards.append({"file": name, "tokens": int(a.size), "sha256": write_shard(out / name, a)})
        meta["splits"][split] = {"documents": len(arrays), "tokens": int(sum(a.size for a in arrays)),
                                 "shards": shards}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def assert_png(path: Path, min_side: int = 100) -> None:
    """`path` decodes as a PNG picture of at least min_side pixels a side that is not one flat colour."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    image = matplotlib.image.imread(path)
    assert min(image.shape[:2]) >= min_side and image.std() > 0, (path, image.shape)

