"""Where models, adapters and text come from.

- :mod:`~modelfactory.sources.hub`  Hugging Face Hub repos (revision → commit SHA → download).
- :mod:`~modelfactory.sources.gguf`  ``.gguf`` files, dequantized to fp16 safetensors.
- :mod:`~modelfactory.sources.model_dir` / :mod:`~modelfactory.sources.safetensors_check`  early checks on
  what a model folder holds. ``s3://`` prefixes are fetched by :func:`modelfactory.s3.fetch_source`.
- :mod:`~modelfactory.sources.text`  calibration / evaluation text; :mod:`~modelfactory.sources.finetune`
  the demo LoRA.
"""
