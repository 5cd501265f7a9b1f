"""LoID: per-domain LoRA plugins for rating prediction with ID-content alignment (pure torch/peft here;
the registered objective, trained by the shared Ray Train loop, is trainers/loid/objective.py)."""
