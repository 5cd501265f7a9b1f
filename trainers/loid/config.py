"""Config of LoID (section ``loid:``, the nested config of ``train.objective=loid``): which domain is the source
and which the target, the LoRA plugin, the ID-content attention and triplet loss (margin, lambda) and how many
epochs. The workers, DeepSpeed, optimizer, batch size and checkpoints are the shared ``train:`` section's.
Read by `recllm train-loid` (and `recllm train` with train.objective=loid) and `recllm evaluate-loid`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.config_schema import choice, positive

POOLING = ("mean", "last")
MERGE = ("stack", "merge")


@dataclass
class LoIDConfig:
    source_domains: list[str] = field(default_factory=lambda: ["digital_music"])
    """Domains (names under reviews.domains) that each train and save a plugin before the target."""
    target_domain: str = "musical_instruments"
    """Domain trained last and evaluated (valid/test MSE)."""
    plugins: str = "stack"
    """stack: every source plugin active and frozen beside the target LoRA | merge: the sources merged
    into one frozen adapter first (peft add_weighted_adapter, combination cat)."""
    variants: list[str] = field(default_factory=lambda: ["loid", "loid_no_cl", "loid_plugin"])
    """Target runs for the table: loid (target LoRA only), loid_no_cl (lambda=0), loid_plugin (frozen
    source plugin(s) + target LoRA)."""
    lora_r: int = 8
    """LoRA rank of every plugin."""
    lora_alpha: int = 16
    """LoRA scaling numerator."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "o_proj",
                                                                      "up_proj", "down_proj"])
    """Linear layers of the LM that carry the plugins."""
    pooling: str = "last"
    """How the LM's last hidden states become one vector: last (token) | mean (over real tokens)."""
    review_tokens: int = 32
    """Tokens kept of each history review for the text encoder."""
    cl_weight: float = 0.1
    """lambda in L = L_rec + lambda * L_cl (0 turns the contrastive term off)."""
    margin: float = 0.5
    """Delta of the triplet margin loss (on L2-normalised vectors, so in [0, 2])."""
    epochs: int = 3
    """Passes over the domain's train reviews."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs)."""
    run: str = ""
    """The planned run that `recllm train` trains (source_<domain> or a variant); `train-loid` sets it per run."""

    def check(self) -> list[str]:
        problems = choice("pooling", self.pooling, POOLING) + choice("plugins", self.plugins, MERGE)
        problems += [f"variants: {v!r} is not one of ['loid', 'loid_no_cl', 'loid_plugin']" for v in self.variants
                     if v not in ("loid", "loid_no_cl", "loid_plugin")]
        for name in ("lora_r", "lora_alpha", "review_tokens", "epochs"):
            problems += positive(name, getattr(self, name))
        for name in ("cl_weight", "margin", "max_steps"):
            problems += positive(name, getattr(self, name), allow_zero=True)
        if self.target_domain in self.source_domains:
            problems.append(f"target_domain: {self.target_domain!r} is also a source domain")
        return problems
