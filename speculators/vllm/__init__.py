"""vLLM backends: hidden-state capture, answer regeneration and the vLLM evaluator's engine code.

Imported only inside the separate vLLM environment (`.venv-vllm`); the main environment never
imports vLLM, it runs these modules through that interpreter (`speculators.vllm.runner`).
"""
