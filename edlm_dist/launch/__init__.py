"""Launch helpers: Hugging Face export, ZeRO checkpoint consolidation."""
