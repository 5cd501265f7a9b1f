"""Training objectives of the shared trainer: plain alignment SFT, ControlRec and CLLM4Rec (pure torch)."""
