"""Writing to disk safely, below every other layer (it imports only :mod:`edlm_dist.errors`).

* :mod:`~edlm_dist.storage.files`   the one write path: atomic files, crash-safe appends, folder swaps,
  and readers that turn a corrupt JSON / JSONL file into one ``error:`` line
* :mod:`~edlm_dist.storage.outputs` the output folder of a command: checked before any work, and locked
  (who holds it: host, pid, start time, command; a lock left by a killed run is detected and taken over)

The file *formats* live in :mod:`edlm_dist.artifacts` (and the data folder in :mod:`edlm_dist.data.shards`);
they write through here. See docs/reliability.md.
"""
