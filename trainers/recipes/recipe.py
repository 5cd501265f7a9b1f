"""The recipe contract (issue #28), as torchtune's recipe interface: one typed base class whose methods are the
packed language model's defaults (trainers/packed_lm.py). A recipe subclasses it, registers under a name
(registry.py), and overrides what it changes: ``build`` and ``loss`` always, ``check`` for rules across config
sections, the rest where it is not a packed LM loss (LoID: its own inputs, model, batches, validation, export).
The trainer (ray_launch, ray_worker) calls these methods and nothing else. No Ray or DeepSpeed import here.
"""

from __future__ import annotations

from typing import Any, ClassVar

from trainers import packed_lm
from trainers.recipes.contract import BuiltModel, ObjectiveContext


class PackedLMRecipe:
    """A training recipe: the methods the trainer calls, each defaulting to the packed language model."""

    name: ClassVar[str] = ""
    """The ``train.objective`` it is registered under (set by ``register_objective``)."""
    selection: ClassVar[tuple] = ()
    """(metric, higher is better) the best round is kept by; () keeps the ranking rounds' valid NDCG@10."""
    validates_itself: ClassVar[bool] = False
    """True: ``validate`` scores every step's rounds itself (LoID's valid MSE per epoch) instead of the trainer's
    ranking rounds every ``train.eval_every`` steps."""

    # ------------------------------------------------------------------ driver side: before Ray starts
    @staticmethod
    def check(root) -> list[str]:
        """Problems of the whole config (RecllmConfig) this recipe cannot train, one line each."""
        return []

    @classmethod
    def item_softmax(cls, root) -> str:
        """What the loss normalises an item code token against (``PromptFormat.item_softmax``)."""
        return "vocabulary"

    @classmethod
    def item_rerank(cls, root) -> str:
        """Whether beam search adds the flat item score the loss trained (``PromptFormat.item_rerank``)."""
        return "none"

    @classmethod
    def inputs(cls, cfg) -> dict:
        """What every worker needs besides the config, read and checked here so a bad file is one line."""
        return packed_lm.training_inputs(cfg, cls.item_softmax(cfg), cls.item_rerank(cfg))

    @classmethod
    def train_dir(cls, cfg) -> str:
        """Where the run's checkpoints, logs and best round go."""
        return packed_lm.default_train_dir(cfg)

    @classmethod
    def export(cls, cfg, checkpoint_dir, inputs: dict, train_dir: str) -> str:
        """The trained model, from the final checkpoint (or the best round), to its published folder."""
        return packed_lm.export_language_model(cfg, checkpoint_dir, inputs, train_dir)

    @classmethod
    def memory_workloads(cls, cfg) -> list | None:
        """`recllm plan`: one memory_plan.Workload per run it trains; None plans the packed LM from the config."""
        return None

    # ------------------------------------------------------------------ worker side
    @classmethod
    def build_model(cls, cfg, config: dict) -> BuiltModel:
        """The module the trainer wraps in DeepSpeed (``config``: the inputs and ``ds_config``)."""
        return packed_lm.build_language_model(cfg, config)

    @classmethod
    def build(cls, ctx: ObjectiveContext) -> PackedLMRecipe:
        raise NotImplementedError(f"{cls.__name__}.build")

    def loss(self, model, batch, step: int, device) -> tuple[Any, Any, dict[str, float]]:
        """(loss to backpropagate, per-task [sum, count] rows, scalars for the log) of one micro-batch."""
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def entity_index(self):
        """For a feed whose tokens name the item/user they belong to (ControlRec's visibility matrix), else None."""
        return None

    def batches(self, cfg, config: dict, tokenizer, rank: int, world: int):
        """This worker's resumable batch feed (``next_batch``, ``epoch``, ``state_dict``/``load_state_dict``)."""
        return packed_lm.packed_sample_feed(cfg, config, self.entity_index(), tokenizer, rank, world)

    def validate(self, model, step: int, feed, final: bool) -> dict[str, float]:
        """With ``validates_itself``: this step's valid metrics ({} when it is no round)."""
        return {}

    def finish(self, module) -> dict | None:
        """What to record about the trained module (train/objective/rank-N.json); None records nothing."""
        return None
