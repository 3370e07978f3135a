"""Stage 4, evaluate: measure how many draft tokens the target accepts, and how fast.

`inprocess` (CLI `evaluate`) decodes held-out prompts with transformers; `spec_decode` is the loop.
"""
