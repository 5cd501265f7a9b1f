"""Every path under run_dir, in one place, and the readers of the tables the stages share (the dataset
manifest, the sequence splits, the item codes and new tokens). Paths are ``storage`` URIs, so a run_dir on
``s3://`` works the same. Storage layer: imports nothing of the project but ``storage`` and ``errors``.

    run_dir/
      .lock                       run_lock: one writer at a time
      dataset/                    prepare: manifest.json, items.parquet, users.parquet, interactions/,
                                  sequences/{train,valid,test}/
      baseline/                   train-baseline (its files: baseline_files)
      item_ids/                   build-ids: item_codes.parquet, user_codes.parquet, tokens.json,
                                  codebook.safetensors, text_vectors.safetensors, stats.json
      cache/item_text/<key>       build-ids: the text reader's raw vectors, keyed by the texts and its weights
      samples/                    build-samples, build-review-samples: manifest.json, train/, valid/, test/
      train/                      train (TrainLayout): ray/ (Ray Train checkpoints), best/, logs/metrics.jsonl,
                                  samples_seen/, param_digest/, objective/, memory/ (one file a rank)
      model/                      the exported model
      topk/                       infer
      report/                     evaluate (and report/review_tasks/, report/loid/)
      domains/<domain>/           build-reviews
      loid/<run>/                 train-loid
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from data_pipeline import storage
from data_pipeline.errors import DataError

MANIFEST_FILE = storage.MANIFEST_FILE
"""The manifest a stage folder (dataset/, samples/, baseline/, domains/<d>/reviews/) is published with, last."""
LOCK_FILE = ".lock"
DATASET_DIR = "dataset"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
INTERACTIONS_DIR = "interactions"
SEQUENCES_DIR = "sequences"
SPLITS = ("train", "valid", "test")
ITEM_IDS_DIR = "item_ids"
ITEM_CODES_FILE = "item_codes.parquet"
USER_CODES_FILE = "user_codes.parquet"
TOKENS_FILE = "tokens.json"
CODEBOOK_FILE = "codebook.safetensors"
STATS_FILE = "stats.json"
TEXT_VECTORS_FILE = "text_vectors.safetensors"
"""One tensor, ``text_vectors`` [num_items, dims]: row i is item_id i's whitened, unit-length text vector
(zero for an item without text)."""
ITEM_CODES_COLUMNS = ("item_id", "codes", "tokens")
"""What every reader of item_codes.parquet needs; ``text`` is there for the subtoken scheme only."""
NO_DATASET = "no dataset; run `recllm prepare` first"


class CheckpointFiles:
    """The files of one training checkpoint folder (train/ray/<name>/checkpoint_*), named once for the trainer that
    writes them, the resume lookup that checks them and the exports that read them. The best round's folder
    (train/best/) holds ``BEST_WEIGHTS`` and its state."""

    STATE = "trainer_state.json"
    """Rank 0: {step, lora, best}."""
    WEIGHTS = "model/weights.safetensors"
    """Rank 0: the gathered (trainable, under LoRA) weights."""
    TOKENIZER = "model/tokenizer"
    BEST_WEIGHTS = "weights.safetensors"

    @staticmethod
    def optimizer(rank: int) -> str:
        """The prefix of this rank's optimizer and schedule state (state_io writes .safetensors and .json)."""
        return f"optimizer/rank-{rank}"

    @staticmethod
    def loader(rank: int) -> str:
        """This rank's batch feed position."""
        return f"loader/rank-{rank}.json"

    @classmethod
    def of_rank(cls, rank: int) -> list[str]:
        """What one rank writes into every checkpoint."""
        return [cls.loader(rank), f"{cls.optimizer(rank)}.safetensors", f"{cls.optimizer(rank)}.json"]


class TrainLayout:
    """Every path under one training run's folder (run_dir/train, or loid/<run>/train for LoID): Ray's checkpoints
    and the best round (URIs), and what the trainer appends to as it goes, one file a rank. Those are written to a
    local folder (``local_*``): train_dir itself, or a temporary mirror when train_dir is remote, which ``publish``
    copies there at each checkpoint and at the end."""

    def __init__(self, train_dir: str):
        self.train_dir = train_dir
        if storage.is_remote(train_dir):
            import hashlib
            import tempfile

            key = hashlib.sha256(train_dir.encode()).hexdigest()[:12]
            self.local = Path(tempfile.gettempdir()) / f"recllm-train-{key}"
        else:
            self.local = Path(train_dir)

    @property
    def ray(self) -> str:
        return storage.join(self.train_dir, "ray")

    @property
    def best(self) -> str:
        return storage.join(self.train_dir, "best")

    @property
    def local_logs(self) -> Path:
        return self.local / "logs"

    def local_samples_seen(self, rank: int) -> Path:
        return self.local / "samples_seen" / f"rank-{rank}.jsonl"

    def local_param_digest(self, rank: int) -> Path:
        return self.local / "param_digest" / f"rank-{rank}.txt"

    def local_objective(self, rank: int) -> Path:
        return self.local / "objective" / f"rank-{rank}.json"

    def local_memory(self, rank: int) -> Path:
        return self.local / "memory" / f"rank-{rank}.json"

    def publish(self, rank: int) -> None:
        """Copy this rank's appended files (rank 0: the logs too) to a remote train_dir; local runs write in place."""
        if not storage.is_remote(self.train_dir):
            return
        mine = [path(rank) for path in (self.local_samples_seen, self.local_param_digest, self.local_objective,
                                         self.local_memory)]
        if rank == 0:
            mine += [p for p in self.local_logs.rglob("*") if p.is_file()]
        fs, root = storage.filesystem(self.train_dir)
        for path in mine:
            if path.is_file():
                rel = path.relative_to(self.local).as_posix()
                fs.makedirs(f"{root}/{rel.rsplit('/', 1)[0]}", exist_ok=True)
                fs.put_file(str(path), f"{root}/{rel}")


@dataclass(frozen=True)
class RunLayout:
    """The folders and files of one run_dir (a local path or an ``s3://`` URI)."""

    run_dir: str

    def path(self, *parts: str) -> str:
        return storage.join(self.run_dir, *parts)

    @property
    def lock(self) -> str:
        return self.path(LOCK_FILE)

    # dataset/: written by `recllm prepare`

    @property
    def dataset(self) -> str:
        return self.path(DATASET_DIR)

    @property
    def dataset_manifest(self) -> str:
        return self.path(DATASET_DIR, MANIFEST_FILE)

    @property
    def items(self) -> str:
        return self.path(DATASET_DIR, ITEMS_FILE)

    @property
    def users(self) -> str:
        return self.path(DATASET_DIR, USERS_FILE)

    @property
    def interactions(self) -> str:
        return self.path(DATASET_DIR, INTERACTIONS_DIR)

    def sequences(self, split: str) -> str:
        return sequences_dir(self.dataset, split)

    # item_ids/: written by `recllm build-ids`

    @property
    def item_ids(self) -> str:
        return self.path(ITEM_IDS_DIR)

    @property
    def item_codes(self) -> str:
        return self.path(ITEM_IDS_DIR, ITEM_CODES_FILE)

    @property
    def user_codes(self) -> str:
        return self.path(ITEM_IDS_DIR, USER_CODES_FILE)

    @property
    def tokens(self) -> str:
        return self.path(ITEM_IDS_DIR, TOKENS_FILE)

    @property
    def codebook(self) -> str:
        return self.path(ITEM_IDS_DIR, CODEBOOK_FILE)

    @property
    def item_ids_stats(self) -> str:
        return self.path(ITEM_IDS_DIR, STATS_FILE)

    @property
    def text_vectors(self) -> str:
        return self.path(ITEM_IDS_DIR, TEXT_VECTORS_FILE)

    def text_vectors_cache(self, key: str) -> str:
        """The reader's raw vectors for one (texts, weights, layer, tokens) key: reused by any later build-ids."""
        return self.path("cache", "item_text", f"{key}.safetensors")

    # the later stages' folders

    @property
    def baseline(self) -> str:
        return self.path("baseline")

    @property
    def samples(self) -> str:
        return self.path("samples")

    @property
    def samples_manifest(self) -> str:
        return self.path("samples", MANIFEST_FILE)

    def samples_split(self, split: str) -> str:
        return self.path("samples", split)

    @property
    def train(self) -> str:
        return self.path("train")

    @property
    def train_metrics(self) -> str:
        """The training loop's metrics log (rank 0), copied into train/ with each checkpoint."""
        return self.path("train", "logs", "metrics.jsonl")

    @property
    def model(self) -> str:
        return self.path("model")

    @property
    def topk(self) -> str:
        return self.path("topk")

    def report(self, *name: str) -> str:
        """report/, or a named report beside it (report/review_tasks, report/loid)."""
        return self.path("report", *name)

    def domain(self, name: str) -> str:
        return self.path("domains", name)

    def loid(self, *run: str) -> str:
        """loid/, or one LoID run's folder under it."""
        return self.path("loid", *run)

    # readers of the shared tables

    def read_manifest(self) -> dict:
        """dataset/manifest.json, as every later stage reads it first."""
        return read_dataset_manifest(self.dataset)

    def read_sequences(self, split: str, columns: list[str] | None = None) -> pa.Table:
        return read_sequences(self.dataset, split, columns)

    def read_item_codes(self) -> pa.Table:
        return read_item_codes(self.item_ids)

    def read_new_tokens(self) -> list[str]:
        return read_new_tokens(self.item_ids)


# The readers take the folder, so that they also read a dataset/ or item_ids/ that is not the run's own
# (a review domain's dataset/, ``ids.assign_from``).

def sequences_dir(dataset_dir: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}, expected one of {SPLITS}")
    return storage.join(dataset_dir, SEQUENCES_DIR, split)


def read_dataset_manifest(dataset_dir: str) -> dict:
    return storage.read_json(storage.join(dataset_dir, MANIFEST_FILE), NO_DATASET)


def read_sequences(dataset_dir: str, split: str, columns: list[str] | None = None) -> pa.Table:
    """One split of dataset/sequences/ (user_id, history, target ...), rows in file order."""
    return storage.read_parquet(sequences_dir(dataset_dir, split), columns)


def read_item_codes(item_ids_dir: str) -> pa.Table:
    """item_codes.parquet of an item_ids/ folder (the run's, or ``ids.assign_from``); missing, unreadable or
    without one of ITEM_CODES_COLUMNS is a DataError naming it."""
    uri = storage.join(item_ids_dir, ITEM_CODES_FILE)
    if not storage.exists(uri):
        raise DataError(uri, "no item codes; run `recllm build-ids` first")
    table = storage.read_parquet(uri)
    for name in ITEM_CODES_COLUMNS:
        if name not in table.column_names:
            raise DataError(uri, f"column missing (found {table.column_names}); rebuild with `recllm build-ids`",
                            field=name)
    return table


def read_new_tokens(item_ids_dir: str) -> list[str]:
    """tokens.json: the LM tokens build-ids added, a JSON list of distinct non-empty strings."""
    uri = storage.join(item_ids_dir, TOKENS_FILE)
    tokens = storage.read_json(uri, "not found; run `recllm build-ids` first")
    if not isinstance(tokens, list) or not all(isinstance(t, str) and t.strip() == t and t for t in tokens):
        raise DataError(uri, "expected a JSON list of token strings (non-empty, no surrounding spaces); "
                             "rebuild with `recllm build-ids`")
    if len(set(tokens)) != len(tokens):
        repeated = next(t for t, n in Counter(tokens).items() if n > 1)
        raise DataError(uri, f"token {repeated!r} appears twice; rebuild with `recllm build-ids`")
    return tokens
