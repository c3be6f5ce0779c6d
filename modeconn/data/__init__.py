"""Token data: tokenizer, corpus sources, binary shards, the prepare command, the loader."""
