"""The GPT-2 BPE tokenizer (tiktoken), online or from a local BPE file.

Order of lookup: an explicit file (config `tokenizer.bpe_file`), then the environment variable
MODECONN_GPT2_BPE, then `tiktoken.get_encoding("gpt2")`, which downloads and caches its file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from modeconn.errors import DataError

BPE_ENV_VAR = "MODECONN_GPT2_BPE"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257
GPT2_PATTERN = r50k_pat_str  # GPT-2's pre-tokenisation regex, as tiktoken ships it


def gpt2_from_file(path: Path) -> tiktoken.Encoding:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"GPT-2 BPE file {path} does not exist")
    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as e:  # tiktoken raises ValueError/binascii.Error on a foreign file
        raise DataError(f"GPT-2 BPE file {path} is not a tiktoken BPE file ({e})") from None
    if len(ranks) != EOT_ID:
        raise DataError(f"GPT-2 BPE file {path} has {len(ranks)} ranks; GPT-2's has {EOT_ID}")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT_TOKEN: EOT_ID})


def gpt2_tokenizer(bpe_file: Optional[str] = None) -> tiktoken.Encoding:
    path = bpe_file or os.environ.get(BPE_ENV_VAR)
    if path:
        return gpt2_from_file(Path(path))
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cached file
        raise DataError(
            f"cannot load the GPT-2 tokenizer: tiktoken.get_encoding('gpt2') failed ({type(e).__name__}: {e}). "
            f"Fix it either way: (1) give a local BPE file with tokenizer.bpe_file=PATH or the environment "
            f"variable {BPE_ENV_VAR}=PATH (e.g. ../shared/data/gpt2.tiktoken), or (2) allow network access "
            f"once so tiktoken can download and cache it (TIKTOKEN_CACHE_DIR sets where).") from None
