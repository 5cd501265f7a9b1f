"""Config of the training objective (``train.objective`` and its sections ``train.sequence`` /
``train.controlrec`` / ``train.cllm4rec``): which recipe's losses the shared trainer adds to the packed SFT loss, each component
behind its own switch so an ablation is one ``key=value`` away.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.config_schema import choice, positive

SEQUENCE_SOFTMAXES = ("per_level", "trie")


@dataclass
class SequenceConfig:
    item_softmax: str = "per_level"
    """What each code of a target item is scored against: per_level (a softmax over that code level's tokens) |
    trie (over the children of the item's code prefix only: the item's exact log-likelihood under the
    constrained decoder, a hierarchical softmax that spends nothing on codes its prefix already decides). Beam
    search reads the model the same way. Atomic IDs: the two are the same softmax over item tokens."""

    item_loss: float = 0.0
    """Weight of a flat item softmax beside the codes (semantic IDs only; 0: off). At each position that predicts
    an item's first code, every item is scored by the hidden state times the sum of its code rows (no new
    parameters), and the cross-entropy against the item that follows is added with this weight. It teaches the
    states to separate whole items, not only code prefixes. Costs an [items x hidden] product per micro-step."""

    def check(self) -> list[str]:
        return choice("item_softmax", self.item_softmax, SEQUENCE_SOFTMAXES) + positive(
            "item_loss", self.item_loss, allow_zero=True)


@dataclass
class ControlRecConfig:
    hfm: bool = True
    """Heterogeneous feature matching: ID representation vs description, history vs next item's description."""
    hfm_weight: float = 1.0
    """Weight of the HFM loss (item-description + sequence-prediction terms)."""
    hfm_negatives: int = 7
    """K: negative descriptions per positive (the other items of the HFM batch; batch = K + 1)."""
    description_words: int = 32
    """Words of title + description encoded as an item's description."""
    icl: bool = True
    """Instruction contrastive learning over the paraphrase bank (data_pipeline/samples/instructions/)."""
    icl_lambda0: float = 0.1
    """lambda_t = lambda0 + (1 - lambda0) * t / T: the ICL weight grows linearly to 1 over the run."""
    icl_anchors: int = 8
    """Target instructions per step (each with 1 positive paraphrase)."""
    icl_negatives: int = 6
    """M: instructions of other tasks per anchor."""
    temperature: float = 0.1
    """Softmax temperature over cosine similarities (HFM and ICL)."""
    visibility: bool = True
    """Visibility matrix: ID tokens attend to other ID tokens only when the two are related in the train graph."""
    visibility_window: int = 0
    """Items are related when one user interacted with both within this many positions (0: anywhere in history)."""

    def check(self) -> list[str]:
        problems = []
        for name in ("hfm_negatives", "description_words", "icl_anchors", "icl_negatives", "temperature"):
            problems += positive(name, getattr(self, name))
        for name in ("hfm_weight", "visibility_window"):
            problems += positive(name, getattr(self, name), allow_zero=True)
        if not 0.0 <= self.icl_lambda0 <= 1.0:
            problems.append(f"icl_lambda0: {self.icl_lambda0}; expected a value in [0, 1]")
        return problems


@dataclass
class CLLM4RecConfig:
    mutual_regularization: float = 1.0
    """lambda of the mutual regularization between collaborative (<item_N>) and content (<text_item_N>) token rows."""
    multinomial_head: bool = True
    """Score the sequential task with one softmax over item tokens (the multinomial item head)."""
    collaborative_restricted: bool = True
    """collaborative_lm: predict its main text (item tokens only) with a softmax over item tokens."""
    content_restricted: bool = True
    """content_lm: predict its main text (vocabulary only) with a softmax over the original vocabulary."""

    def check(self) -> list[str]:
        return positive("mutual_regularization", self.mutual_regularization, allow_zero=True)
