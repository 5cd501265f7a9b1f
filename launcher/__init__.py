"""Entry points: the `recllm` CLI, the composed config, and the stage pipeline."""
