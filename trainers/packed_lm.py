"""The packed language model's parts, the defaults of every recipe (trainers/recipes/recipe.py): on the driver, the
inputs read and checked before Ray starts (new tokens, their texts and vectors, tasks, prompt format), the train
folder and the export to run_dir/model/; on a worker, the model with the run's new tokens (LoRA, ZeRO-3
partitioned build) and the sample feed (samples/train tokenised in Ray Data, packed, resumable). No Ray import;
DeepSpeed only inside the model build, through trainers.deepspeed_engine.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data_pipeline import storage
from data_pipeline.errors import DataError
from data_pipeline.item_ids.item_codes import item_ids_files, read_item_ids_checked
from data_pipeline.run_layout import STATS_FILE, RunLayout
from data_pipeline.samples.prompt_format import PromptFormat, pad_token_id
from trainers.model_files import check_checkpoint
from trainers.packing import Packer, TokenizedSample, tokenize_sample
from trainers.recipes.contract import BuiltModel

SAMPLE_COLUMNS = ["sample_id", "task", "prompt", "response"]



def read_samples_manifest(run_dir: str, item_ids_dir: str) -> dict:
    """samples/manifest.json, after checking that samples/ holds exactly the files it lists, byte for byte (a
    shard from another run is refused) and that item_ids/ is the one the samples were written from."""
    layout = RunLayout(run_dir)
    samples_dir, uri = layout.samples, layout.samples_manifest
    manifest = storage.read_json(uri, "not found; run `recllm build-samples` first")
    if manifest.get("files"):
        storage.verify_files(samples_dir, manifest["files"], uri, "rerun `recllm build-samples`")
    stats_uri = storage.join(item_ids_dir, STATS_FILE)
    current = item_ids_files(storage.read_json(stats_uri)) if storage.exists(stats_uri) else {}
    for rel, sha in manifest.get("item_ids", {}).items():
        if rel in current and current[rel] != sha:
            raise DataError(uri, f"samples were written from another item_ids/{rel} than {item_ids_dir} holds now "
                                 "(build-ids ran again since); rerun `recllm build-samples`", field="item_ids")
    return manifest


def training_inputs(cfg, item_softmax: str = "vocabulary", item_rerank: str = "none") -> dict:
    """What every worker needs besides the config: new tokens, their texts, the task list, the prompt format (with
    the recipe's ``item_softmax`` and ``item_rerank`` rules).
    Every input is read and checked here, before Ray starts, so a bad one is one line naming the file."""
    run_dir = storage.absolute(cfg.run_dir)
    layout = RunLayout(run_dir)
    codes, new_tokens = read_item_ids_checked(layout.item_ids)
    manifest = read_samples_manifest(run_dir, layout.item_ids)
    check_checkpoint(cfg.model, new_tokens, layout.tokens)
    tasks = list(manifest["config"]["tasks"])
    sequence = "user_sequence" in tasks
    prompt_format = PromptFormat(
        style="sequence" if sequence else "instruction",
        max_history=manifest["config"].get("max_sequence_items", 50) if sequence
        else manifest["config"]["max_history_in_prompt"],
        item_softmax=item_softmax, item_rerank=item_rerank)
    token_texts = None
    if cfg.model.new_token_init == "text":
        items = storage.read_parquet(layout.items, ["item_id", "title"])
        titles = {r["item_id"]: r["title"] for r in items.to_pylist() if r["title"]}
        rows = codes.select(["item_id", "tokens"]).to_pylist() if codes is not None else []
        token_texts = {row["tokens"][0]: titles[row["item_id"]] for row in rows
                       if len(row["tokens"]) == 1 and row["item_id"] in titles}
    token_vectors = collaborative_vectors(cfg, run_dir, new_tokens) if cfg.model.new_token_init == "collab" else None
    return {"run_dir": run_dir, "new_tokens": new_tokens, "tasks": tasks, "token_texts": token_texts,
            "token_vectors": token_vectors, "prompt_format": prompt_format}


def collaborative_vectors(cfg, run_dir: str, new_tokens: list[str]) -> dict[str, np.ndarray]:
    """model.new_token_init=collab: token -> collaborative vector. Semantic code tokens take their codebook
    vectors (item_ids/codebook.safetensors); single-token items (atomic IDs) the baseline SASRec's item vectors
    (run_dir/baseline, trained with this run's settings)."""
    from data_pipeline.baseline_files import baseline_settings, read_item_embeddings
    from data_pipeline.item_ids.build_ids import load_codebook
    from data_pipeline.item_ids.item_codes import semantic_vocabulary

    layout = RunLayout(run_dir)
    if storage.exists(layout.codebook):
        codebooks = load_codebook(layout.item_ids)[0]["codebooks"].float().numpy()  # [levels, codes, dim]
        levels, codes, _ = codebooks.shape
        return {t: codebooks[k // codes, k % codes] for k, t in enumerate(semantic_vocabulary(levels, codes))}
    vectors, _ = read_item_embeddings(run_dir, baseline_settings(cfg.baseline, cfg.seed))
    table = storage.read_parquet(layout.item_codes, ["item_id", "tokens"]).to_pylist()
    single = {row["tokens"][0]: vectors[row["item_id"]] for row in table if len(row["tokens"]) == 1}
    if not single:
        raise DataError(layout.item_codes, "model.new_token_init=collab needs atomic item "
                        "tokens or a semantic codebook; this scheme has neither")
    return single


def default_train_dir(cfg) -> str:
    return RunLayout(storage.absolute(cfg.run_dir)).train


def export_language_model(cfg, checkpoint_dir, inputs: dict, train_dir: str) -> str:
    """The default ``export``: run_dir/model/, a Hugging Face folder (see export_model)."""
    from trainers.deepspeed_engine import deepspeed_module
    from trainers.export_model import export_checkpoint

    deepspeed_module()  # the export's model build imports it; its load-time notices go to the log file
    return export_checkpoint(cfg, checkpoint_dir, inputs["new_tokens"], inputs["token_texts"],
                             prompt_format=inputs["prompt_format"])


def tokenizing_transform(tokenizer, tasks: list[str], seq_len: int, entity_index=None):
    """A Ray Data map function: sample rows -> token ids (one output row per input row); with an
    ``entity_index`` (ControlRec's visibility matrix) also the item/user each token names."""
    task_index = {t: i for i, t in enumerate(tasks)}

    def transform(table: pa.Table) -> pa.Table:
        ids, prompt_lens, entities = [], [], []
        for task, prompt, response in zip(table.column("task").to_pylist(), table.column("prompt").to_pylist(),
                                          table.column("response").to_pylist()):
            if entity_index is None:
                tokens, n_prompt = tokenize_sample(tokenizer, prompt, response, seq_len, task)
            else:
                from trainers.recipes.visibility import tokenize_with_entities

                tokens, n_prompt, ents = tokenize_with_entities(tokenizer, prompt, response, seq_len,
                                                                entity_index, task)
                entities.append(ents)
            ids.append(tokens)
            prompt_lens.append(n_prompt)
        columns = {"sample_id": table.column("sample_id"),
                   "task": pa.array([task_index[t] for t in table.column("task").to_pylist()], pa.int32()),
                   "input_ids": pa.array(ids, pa.list_(pa.int32())),
                   "prompt_len": pa.array(prompt_lens, pa.int32())}
        if entity_index is not None:
            columns["entities"] = pa.array(entities, pa.list_(pa.int64()))
        return pa.table(columns)

    return transform


class SampleFeed:
    """This worker's endless sample stream (epochs repeat) feeding the packer; resumable."""

    def __init__(self, stream, packer: Packer):
        self.stream, self.packer = stream, packer
        self._iter = None

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "packer": self.packer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.packer.load_state_dict(state["packer"])

    def _next_table(self) -> pa.Table:
        for _ in range(2):
            if self._iter is None:
                self._iter = iter(self.stream)
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
                self.stream.set_epoch(self.stream.epoch + 1)
        raise RuntimeError("the sample stream is empty for this worker (fewer samples than workers?)")

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def next_batch(self):
        while self.packer.need():
            table = self._next_table()
            entities = (table.column("entities").to_pylist() if "entities" in table.column_names
                        else [None] * table.num_rows)
            self.packer.add(TokenizedSample(int(s), int(t), ids, int(p), e) for s, t, ids, p, e in zip(
                table.column("sample_id").to_pylist(), table.column("task").to_pylist(),
                table.column("input_ids").to_pylist(), table.column("prompt_len").to_pylist(), entities))
        return self.packer.build()


def build_language_model(cfg, config: dict):
    """The default ``build_model``: the LM with the run's new tokens, LoRA when train.finetune=lora. Under ZeRO-3
    it is built and loaded partitioned, and the host memory it took is recorded."""
    from trainers import deepspeed_engine as dse
    from trainers.lora_adapters import apply_lora
    from trainers.models import build_model

    tcfg, new_tokens = cfg.train, config["new_tokens"]
    with dse.model_init_context(config["ds_config"]) as sharded:
        memory = {"before_build": dse.host_rss()}  # after the context's imports: the build's own memory only
        model, tokenizer = build_model(cfg.model, new_tokens, token_texts=config.get("token_texts"),
                                       token_vectors=config.get("token_vectors"), device="cpu", seed=cfg.seed,
                                       sharded=sharded)
    memory.update(after_build=dse.host_rss(), **dse.model_host_bytes(model))
    new_ids = tokenizer.convert_tokens_to_ids(new_tokens) if new_tokens else []
    lora = tcfg.finetune == "lora"
    if lora:
        model = apply_lora(model, new_ids, tcfg.lora_r, tcfg.lora_alpha, tcfg.lora_dropout, tcfg.lora_target_modules)
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if lora:
            model.enable_input_require_grads()
    return BuiltModel(model, tokenizer, trainable_only=lora, host_memory=memory)


def packed_sample_feed(cfg, config: dict, entity_index, tokenizer, rank: int, world: int) -> SampleFeed:
    """The default batch source: this worker's share of samples/train, tokenised in Ray Data, packed; with an
    ``entity_index`` (ControlRec's visibility matrix) each token also names the item/user it belongs to."""
    from data_pipeline.streaming_reader import ShardedParquetStream

    tcfg = cfg.train
    stream = ShardedParquetStream(RunLayout(config["run_dir"]).samples_split("train"), rank, world, batch_size=64,
                                  seed=cfg.seed, columns=SAMPLE_COLUMNS,
                                  transform=tokenizing_transform(tokenizer, config["tasks"], tcfg.seq_len,
                                                                 entity_index))
    return SampleFeed(stream, Packer(tcfg.seq_len, tcfg.micro_batch_size, pad_token_id(tokenizer),
                                     tcfg.packing_lookahead, tcfg.packing))
