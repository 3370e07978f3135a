"""Stage 2: the target's hidden states per prepared sample, plus their `data_config.json`.

`capture` is the CLI and the transformers backend; `store` is the file format every backend uses.
"""
