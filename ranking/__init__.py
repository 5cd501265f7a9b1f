"""Scoring a trained model in one process: the top-K scorer (trie-constrained beam search or the multinomial
item head, over the prompts the model was trained on) and the ranking metrics. Both training (validation
rounds, the baseline's early stopping) and the Ray inference and evaluate stages call it, so it sits in the
models layer below them.
"""
