"""Config of the baseline stage (section ``baseline:``, `recllm train-baseline`): SASRec's size, objective,
optimiser and early stopping.

One SASRec serves two consumers: its item embeddings feed the semantic-ID quantiser, and the
trained model is the sequential baseline the evaluation compares against.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.config_schema import choice, positive

LOSSES = ("ce", "bce")


@dataclass
class SASRecConfig:
    hidden_size: int = 256
    """Width of item/position embeddings and of every attention block. 256 with one block was chosen on valid: it
    beats 64 with two blocks on Beauty (valid NDCG@10 0.0663 vs 0.0631) and Scientific (0.0917 vs 0.0860), as in
    the eSASRec benchmark's run config (n_factors 256, 1 block)."""
    num_blocks: int = 1
    """Number of stacked causal self-attention blocks."""
    num_heads: int = 1
    """Attention heads per block; must divide hidden_size."""
    max_len: int = 50
    """Longest history the model reads (most recent items); longer ones are cut from the left."""
    dropout: float = 0.2
    """Dropout on embeddings, attention weights and feed-forward outputs."""
    loss: str = "ce"
    """ce: softmax over all items (better on small catalogues) | bce: one sampled negative, as in the paper."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (0 gives plain Adam, as in the paper)."""
    batch_size: int = 128
    """Users per training batch; each contributes every position of its training sequence."""
    epochs: int = 100
    """Upper bound on passes over the training users; early stopping usually ends sooner."""
    patience: int = 5
    """Stop after this many validation rounds without a better valid NDCG@10; the best weights are kept."""
    eval_every: int = 1
    """Epochs between validation rounds (full-ranking NDCG@10 on the valid split)."""
    eval_exclude_seen: bool = True
    """Rank only items absent from the user's history when measuring valid/test metrics."""
    eval_batch_size: int = 1024
    """Users scored at once during evaluation; bounds the [batch, num_items] score matrix."""
    device: str = "cpu"
    """Torch device: cpu, cuda or cuda:N."""
    num_threads: int = 1
    """CPU threads torch may use while training (0 keeps torch's default); 1 avoids contention on shared cores."""

    def check(self) -> list[str]:
        problems = choice("loss", self.loss, LOSSES)
        for name in ("hidden_size", "num_blocks", "num_heads", "max_len", "batch_size", "epochs", "patience",
                     "eval_every", "eval_batch_size", "lr"):
            problems += positive(name, getattr(self, name))
        problems += positive("weight_decay", self.weight_decay, allow_zero=True)
        problems += positive("num_threads", self.num_threads, allow_zero=True)
        if self.hidden_size > 0 and self.num_heads > 0 and self.hidden_size % self.num_heads:
            problems.append(f"num_heads: {self.num_heads} does not divide hidden_size {self.hidden_size}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout: {self.dropout!r} must be in [0, 1)")
        device = self.device.split(":", 1)
        if device[0] not in ("cpu", "cuda") or (len(device) == 2 and not (device[0] == "cuda" and device[1].isdigit())):
            problems.append(f"device: {self.device!r} is not cpu, cuda or cuda:N")
        return problems
