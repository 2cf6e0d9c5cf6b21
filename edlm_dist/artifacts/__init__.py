"""On-disk formats: one module per format, owning its file names, writers and readers.

* :mod:`~edlm_dist.artifacts.checkpoint`  ``OUT/checkpoints/step_X`` + ``latest``: resumable DeepSpeed state, EMA
* :mod:`~edlm_dist.artifacts.weights`     ``OUT/weights``: full safetensors + ``meta.json``; model and tokenizer loading
* :mod:`~edlm_dist.artifacts.zero_to_fp32` a checkpoint consolidated into a weights folder
* :mod:`~edlm_dist.artifacts.hf_export`   ``edlm export-hf`` folders; :mod:`~edlm_dist.artifacts.hf_models` their classes
* :mod:`~edlm_dist.artifacts.samples`     ``samples.jsonl`` + ``summary.json`` written by ``edlm sample``
* :mod:`~edlm_dist.artifacts.readers`     the one read path (a corrupt file is one error line); :mod:`~edlm_dist.artifacts.provenance` the code version

The prepared data folder (shards, ``manifest.json``, ``tokenizer/``) is owned by
:mod:`edlm_dist.data.shards`, one layer down, because ``edlm prepare-data`` writes it.
"""
