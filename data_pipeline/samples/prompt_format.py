"""The prompt format: how a sample's text becomes the token ids the model sees. Training tokenises with it,
export saves it next to the model (``prompt_format.json``, as litgpt saves ``prompt_style.yaml``), and
inference loads it, so a user's prompt is framed exactly as the model was trained: BOS, the instruction frame
(or none, for the sequence-level task), the cut of long prompts and the padding id.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from data_pipeline import storage
from data_pipeline.errors import DataError

PROMPT_FORMAT_FILE = "prompt_format.json"
STYLES = ("instruction", "sequence")
ITEM_SOFTMAXES = ("vocabulary", "per_level", "trie")
ITEM_RERANKS = ("none", "flat")
SEQUENCE_TASKS = ("user_sequence",)
"""Tasks whose samples are item sequences with no frame; every other task is framed as an instruction."""


def pad_token_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS (LLaMA tokenizers have no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def fit_sample(head: list[int], prompt: list, response: list, eos, seq_len: int) -> tuple[list, int]:
    """head + prompt + response + EOS cut to ``seq_len``: the response keeps its start, the prompt loses its
    start. Works on any per-token lists (ids, or the entity keys that ride along with them)."""
    response = (response + [eos])[: seq_len - len(head) - 1]
    room = seq_len - len(head) - len(response)
    prompt = prompt[-room:] if room > 0 else []
    return head + prompt + response, len(head) + len(prompt)


@dataclass(frozen=True)
class PromptFormat:
    style: str = "instruction"
    """instruction: BOS + prompt + '\\nAnswer: ' before the answer | sequence: BOS + the user's items, no frame."""
    max_history: int = 20
    """History items an inference prompt names (the most recent ones), as the training samples did."""
    item_separator: str = ""
    """How the sequence style joins item names ('' for token names such as <item_3> or <a_1><b_2>)."""
    item_softmax: str = "vocabulary"
    """What an item code token's probability was trained against, so what beam search normalises over:
    vocabulary (next-token loss) | per_level (the sequence objective: a softmax over that code level's tokens) |
    trie (the sequence objective: a softmax over the children of the item's code prefix)."""
    item_rerank: str = "none"
    """How beam search orders the items it found: none (by their code log-probability) | flat (plus the flat item
    score the sequence objective trained with ``train.sequence.item_loss``: the prompt's last state times the
    sum of the item's code rows)."""

    def frame(self, prompt: str) -> str:
        return f"{prompt}\nAnswer: " if self.style == "instruction" else prompt

    def head(self, tokenizer) -> list[int]:
        return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def sample_ids(self, tokenizer, prompt: str, response: str, seq_len: int) -> tuple[list[int], int]:
        """(input_ids, prompt_len) of one training sample: head + framed prompt + response + EOS.

        Too long: an instruction keeps its response and loses the prompt's start; a sequence keeps its most
        recent items (the response loses its start)."""
        head = self.head(tokenizer)
        framed = self.frame(prompt)
        prompt_ids = tokenizer(framed, add_special_tokens=False)["input_ids"] if framed else []
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        response_ids = self.recent_response(response_ids, len(head), len(prompt_ids), seq_len)
        return fit_sample(head, prompt_ids, response_ids, tokenizer.eos_token_id, seq_len)

    def recent_response(self, response: list, head_len: int, prompt_len: int, seq_len: int) -> list:
        """A sequence's response keeps its most recent tokens when the sample is too long (``fit_sample`` then
        keeps its start); an instruction's is left to ``fit_sample``. Works on any per-token list."""
        if self.style != "sequence":
            return response
        return response[-max(seq_len - head_len - prompt_len - 2, 1):]  # fit_sample keeps 1 free

    def prompt_ids(self, tokenizer, prompts: list[str], max_prompt_tokens: int | None = None) -> list[list[int]]:
        """Token ids of inference prompts as training saw them: head + framed prompt, cut from the left to
        ``max_prompt_tokens`` (head kept)."""
        head = self.head(tokenizer)
        framed = [self.frame(p) for p in prompts]
        ids = tokenizer(framed, add_special_tokens=False)["input_ids"] if any(framed) else [[] for _ in framed]
        if max_prompt_tokens is not None:
            room = max_prompt_tokens - len(head)
            ids = [row[-room:] if room > 0 else [] for row in ids]
        return [head + list(row) for row in ids]

    def to_json(self) -> str:
        """What export writes to ``PROMPT_FORMAT_FILE`` beside the weights."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def load(cls, folder: str) -> "PromptFormat":
        """The format saved with a model; a model saved before formats were saved was trained on instructions."""
        uri = storage.join(folder, PROMPT_FORMAT_FILE)
        if not storage.exists(uri):
            return cls()
        fields = storage.read_json(uri)
        if not isinstance(fields, dict) or fields.get("style") not in STYLES:
            style = fields.get("style") if isinstance(fields, dict) else None
            raise DataError(uri, f"{style!r}; expected one of {list(STYLES)}", field="style")
        if fields.get("item_softmax", "vocabulary") not in ITEM_SOFTMAXES:
            raise DataError(uri, f"{fields['item_softmax']!r}; expected one of {list(ITEM_SOFTMAXES)}",
                            field="item_softmax")
        if fields.get("item_rerank", "none") not in ITEM_RERANKS:
            raise DataError(uri, f"{fields['item_rerank']!r}; expected one of {list(ITEM_RERANKS)}", field="item_rerank")
        return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls) if f.name in fields})


def format_for_task(task: str) -> PromptFormat:
    return PromptFormat("sequence" if task in SEQUENCE_TASKS else "instruction")
