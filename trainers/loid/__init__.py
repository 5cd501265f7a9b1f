"""LoID: per-domain LoRA plugins for rating prediction with ID-content alignment (pure torch/peft here;
the Ray Train + DeepSpeed loop lives in trainers/loid/ray_train.py)."""
