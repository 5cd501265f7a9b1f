"""Config of the SFT trainer (section ``train:``): cluster shape, DeepSpeed config, LoRA or full
fine-tuning, sequence packing, schedule, logging and checkpoints. Read by `recllm train` and `recllm plan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.config_schema import choice, positive
from trainers.recipes.names import registered_objectives
from trainers.recipes.config import CLLM4RecConfig, ControlRecConfig, SequenceConfig

FINETUNE = ("lora", "full")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainConfig:
    num_workers: int = 2
    """Ray Train workers (one per GPU on a GPU cluster; CPU processes here)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL and bf16; false trains on CPU with gloo and fp32."""
    cpus_per_worker: float = 0.5
    """CPUs Ray reserves per worker (keep below 1 on a 2-core machine or the Parquet reads starve)."""
    gpus_per_node: int = 8
    """GPUs per node, for `recllm plan` and the launchers (the cluster decides the real placement)."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU; `recllm plan` fails a config whose estimate does not fit."""
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    """Standard DeepSpeed JSON; "auto" values are filled from this section."""
    finetune: str = "full"
    """lora (peft adapters + trainable new-token rows) or full fine-tuning."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"])
    """Linear layers that get LoRA adapters."""
    max_steps: int = 50
    """Optimizer steps to run (epochs of the sample stream repeat as needed)."""
    micro_batch_size: int = 4
    """Packed rows per worker per micro-step."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step."""
    seq_len: int = 256
    """Tokens per packed row."""
    packing: bool = True
    """Pack several samples per row (masks keep them apart); false pads one sample per row."""
    packing_lookahead: int = 64
    """Samples the packer may look ahead to fill a row."""
    learning_rate: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 5
    """Linear warm-up steps."""
    lr_schedule: str = "cosine"
    """constant | cosine | linear decay after warm-up."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    log_every: int = 5
    """Steps between metric records (TensorBoard + JSONL)."""
    checkpoint_every: int = 25
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints Ray keeps."""
    max_failures: int = 1
    """Worker failures Ray Train recovers from (restart from the latest checkpoint)."""
    resume: bool = False
    """Continue a stopped run from its latest checkpoint."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one GPU for MFU; 0 detects H100/H200/A100."""
    eval_every: int = 0
    """Steps between validation rounds: HR@10/NDCG@10 on valid users with the inference scorer (0: none)."""
    eval_users: int = 2000
    """Valid users each round scores: a fixed seeded sample (0: all of them)."""
    patience: int = 0
    """Stop after this many validation rounds without a better valid NDCG@10 (0: run max_steps)."""
    select_best: bool = True
    """Export the weights of the best validation round (run_dir/train/best) instead of the last step's."""
    record_samples: bool = True
    """Log the sample_ids each worker trains on per step (samples_seen/), for audits of resumes."""
    objective: str = "sft"
    """A registered objective: sft (packed next-token loss) | sequence (every item of user_sequence samples, softmax over the target's ID group) | controlrec (+ HFM, instruction contrast, visibility) | cllm4rec (+ restricted softmaxes, mutual regularization)."""
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    """The sequence objective's item softmax (objective sequence)."""
    controlrec: ControlRecConfig = field(default_factory=ControlRecConfig)
    """ControlRec's components and weights (objective controlrec)."""
    cllm4rec: CLLM4RecConfig = field(default_factory=CLLM4RecConfig)
    """CLLM4Rec's components and weights (objective cllm4rec)."""

    def check(self) -> list[str]:
        problems = (choice("finetune", self.finetune, FINETUNE) + choice("lr_schedule", self.lr_schedule, SCHEDULES)
                    + choice("objective", self.objective, registered_objectives()))
        for name in ("num_workers", "micro_batch_size", "gradient_accumulation_steps", "seq_len", "max_steps",
                     "log_every", "packing_lookahead", "lora_r", "lora_alpha", "cpus_per_worker",
                     "gpus_per_node", "gpu_memory_gb", "keep_checkpoints"):
            problems += positive(name, getattr(self, name))
        for name in ("checkpoint_every", "eval_every", "eval_users", "patience", "warmup_steps", "max_failures", "weight_decay", "lora_dropout",
                     "peak_tflops"):
            problems += positive(name, getattr(self, name), allow_zero=True)
        if not self.deepspeed_config.endswith(".json"):
            problems.append(f"deepspeed_config: {self.deepspeed_config!r}; expected a DeepSpeed .json file")
        return problems
