"""Data: the synthetic data set, shard/manifest format, tokenizer and runtime loaders."""
