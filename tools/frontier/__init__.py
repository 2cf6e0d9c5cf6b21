"""The measured frontier: every sampler's exact Gen PPL against its cost, and EDLM's speed-ups (docs/frontier.md)."""
