"""Data layer: tokenizers, the exact-oracle synthetic language, shards and loaders."""
