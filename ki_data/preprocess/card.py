"""The output directory as a Hugging Face dataset: `datasets.load_dataset(<out>)` (or `streaming=True`) opens the
shards with typed features, split into train/validation as the manifest says.

`README.md` is a dataset card whose YAML front matter, written with `datasets`' own card helpers (as
`Dataset.push_to_hub` writes it), names the data files of each split and the features: images as `Image` (the
stored PNG/JPEG bytes, decoded on access), vectors and token columns as fixed-length int/bool/float sequences.
Everything comes from the manifest, so the card follows `image_format`, the cameras and the lengths of the run.
"""

from __future__ import annotations

from pathlib import Path

from ki_data import schema
from ki_data.manifest import Manifest
from ki_data.shard_writer import atomic_write_bytes

CARD_FILE = "README.md"
# Our split names -> the Hugging Face convention.
HF_SPLITS = {"train": "train", "val": "validation"}


def hf_features(manifest: Manifest):
    """The shard columns as `datasets.Features`, in the shards' column order: the Arrow schema's (`schema.ShardLayout`),
    with the camera columns as `Image` (decoded on access)."""
    from datasets import Features, Image

    arrow = Features.from_arrow_schema(schema.ShardLayout.of(manifest).arrow_schema())
    return Features({name: Image() if schema.camera_of(name) is not None else feature
                     for name, feature in arrow.items()})


def _column_table(m: Manifest) -> str:
    H, D = m.action_horizon, m.action_dim
    rows = [
        ("episode_index, frame_index, index", "int64", "the source frame (LeRobot episode, frame in it, global index)"),
        ("task", "string", "the task text, as the dataset has it"),
        *[(schema.image_column(c), f"Image ({m.image_format.upper()})",
           f"camera `{m.camera_keys[c]}`, resized with padding to {m.image_size}x{m.image_size}") for c in m.cameras],
        *[(schema.image_mask_column(c), "bool", "the image is real") for c in m.cameras],
        ("state", f"float32[{m.state_dim}]", f"`observation.state`, normalized ({m.norm_mode}, norm_stats.json)"),
        ("actions", f"float32[{H * D}]", f"the next {H} actions ([{H}, {D}] row-major), normalized; padded with the "
         "episode's last action"),
        ("action_is_pad", f"bool[{H}]", "the action step is padding past the episode's end"),
        ("tokenized_prompt", f"int32[{m.max_token_len}]", f"prefix and FAST action postfix ({m.prompt_layout} layout)"),
        ("tokenized_prompt_mask", f"bool[{m.max_token_len}]", "real token (not padding)"),
        ("token_ar_mask", f"bool[{m.max_token_len}]", "postfix token (attends causally)"),
        ("token_loss_mask", f"bool[{m.max_token_len}]", "token is a training target"),
        ("text_prompt", f"int32[{m.max_text_len}]", "the text prefix alone (what inference sees)"),
        ("text_prompt_mask", f"bool[{m.max_text_len}]", "real token"),
    ]
    return "\n".join(["| column | type | meaning |", "| --- | --- | --- |"]
                     + [f"| `{a}` | {b} | {c} |" for a, b, c in rows])


def _body(m: Manifest) -> str:
    s = m.summary
    splits = ", ".join(f"{HF_SPLITS[k]}: {len(v)} episode(s), {s.get(f'rows_{k}', 0):,} rows"
                       for k, v in m.splits.items() if v)
    return f"""
# {m.source['repo_id']} as π0.5 token shards

Training rows made by `python -m pipelines.preprocess` (ki) from the LeRobot dataset `{m.source['repo_id']}`
(codebase {m.source['codebase_version']}, {m.fps:g} fps): one row per frame with its camera images, normalized state,
the chunk of the next {m.action_horizon} actions and the tokenized prompt. Splits hold whole episodes ({splits}).

```python
import datasets
ds = datasets.load_dataset("path/to/this/directory")             # or streaming=True
```

`manifest.json` records the options, the tokenizers and every shard's sha256; `norm_stats.json` undoes the
normalization; `tokenizer/` holds the text tokenizer (vocabulary {m.tokenizers['text'].vocab_size}) and the FAST action
tokenizer (vocabulary {m.tokenizers['fast'].vocab_size}). Token ids are model ids in a vocabulary of {m.vocab_size}.

{_column_table(m)}
"""


def write_card(manifest: Manifest, out: Path) -> None:
    """README.md with the data files of each split and the features in its YAML front matter."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    counts = {"train": manifest.summary.get("rows_train"), "val": manifest.summary.get("rows_val")}
    data_files, splits = [], SplitDict()
    for split in ("train", "val"):
        if not manifest.shard_entries(split):
            continue
        # The split's files by pattern: the shards directory holds exactly the manifest's shards.
        data_files.append({"split": HF_SPLITS[split], "path": f"{schema.SHARDS_DIR}/{split}-*.parquet"})
        splits.add(SplitInfo(HF_SPLITS[split], num_examples=counts[split] or 0))
    card_data = DatasetCardData(tags=["robotics", "lerobot", "ki", "pi0.5"],
                                task_categories=["robotics"])
    MetadataConfigs({"default": {"data_files": data_files}}).to_dataset_card_data(card_data)
    info = DatasetInfo(features=hf_features(manifest), splits=splits)
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    card = DatasetCard(f"---\n{card_data}\n---\n{_body(manifest)}")
    atomic_write_bytes(out / CARD_FILE, str(card).encode())
