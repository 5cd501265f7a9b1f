"""Make the byte-level BPE tokenizer shipped for the ``tiny`` model (``trainers/assets/tiny_tokenizer/``).

Source text: the titles and descriptions of ``data/scientific/Scientific.item.json`` (Amazon Review Data
2018, Industrial & Scientific, LC-Rec processing; see ``data/scientific/SOURCE.md``), in item-id order.
Byte-level, so it encodes any text; the output is the same on every run. Run from the repository root:
``python trainers/assets/make_tiny_tokenizer.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "data" / "scientific" / "Scientific.item.json"
OUT = Path(__file__).resolve().parent / "tiny_tokenizer"
VOCAB_SIZE = 4096
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
MODEL_MAX_LENGTH = 1024  # the tiny model's max_position_embeddings


def item_texts(path: Path) -> list[str]:
    items = json.loads(path.read_text(encoding="utf-8"))
    texts = []
    for key in sorted(items, key=int):
        for name in ("title", "description"):
            text = (items[key].get(name) or "").strip()
            if text:
                texts.append(text)
    return texts


def train(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[UNK, BOS, EOS, PAD],  # ids 0..3, the LLaMA order with pad appended
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so no text is ever unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Like LLaMA's tokenizer: <s> in front of every sequence, no </s>.
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                      special_tokens=[(BOS, tokenizer.token_to_id(BOS))]),
    ])
    return tokenizer


def main() -> None:
    tokenizer = train(item_texts(SOURCE))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=MODEL_MAX_LENGTH)
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(OUT))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    (OUT / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT} (vocab {tokenizer.get_vocab_size()})")


if __name__ == "__main__":
    main()
