"""The shard directory is a Hugging Face dataset (issue 14 part 3): `datasets.load_dataset(<out>)`, eager and
streaming, gives the manifest's splits with typed features and the rows our own reader gives."""

from __future__ import annotations

import dataclasses

import datasets
import numpy as np
import yaml

from ki_data import schema
from ki_data.images import decode_image
from ki_data.manifest import Manifest
from ki_data.preprocess import write_card


def _assert_same_row(hf_row: dict, ours: dict, r: int, m: Manifest) -> None:
    for name in (schema.EPISODE_INDEX, schema.FRAME_INDEX, schema.INDEX, schema.TASK):
        assert hf_row[name] == ours[name][r], name
    for cam in m.cameras:
        np.testing.assert_array_equal(np.asarray(hf_row[schema.image_column(cam)].convert("RGB")),
                                      decode_image(ours[schema.image_column(cam)][r]))
        assert hf_row[schema.image_mask_column(cam)] == ours[schema.image_mask_column(cam)][r]
    actions = np.asarray(hf_row[schema.ACTIONS], np.float32).reshape(m.action_horizon, m.action_dim)
    np.testing.assert_array_equal(actions, ours[schema.ACTIONS][r])
    for name in (schema.STATE, schema.ACTION_IS_PAD, schema.TOKENIZED_PROMPT, schema.TOKENIZED_PROMPT_MASK,
                 schema.TOKEN_AR_MASK, schema.TOKEN_LOSS_MASK, schema.TEXT_PROMPT, schema.TEXT_PROMPT_MASK):
        np.testing.assert_array_equal(np.asarray(hf_row[name]), ours[name][r], err_msg=name)


def test_load_dataset_gives_the_manifests_splits_features_and_rows(demo_shards):
    m = Manifest.load(demo_shards)
    ds = datasets.load_dataset(str(demo_shards))
    assert set(ds) == {"train", "validation"}
    assert (ds["train"].num_rows, ds["validation"].num_rows) == (m.summary["rows_train"], m.summary["rows_val"])
    assert sorted(set(ds["validation"]["episode_index"])) == list(m.splits["val"])
    f = ds["train"].features
    assert list(f) == schema.ShardLayout(m.cameras, m.state_dim, m.action_dim, m.action_horizon, m.max_token_len,
                                         m.max_text_len).column_names()
    assert isinstance(f[schema.image_column(m.cameras[0])], datasets.Image)
    assert f[schema.TOKENIZED_PROMPT] == datasets.List(datasets.Value("int32"), length=m.max_token_len)
    assert f[schema.TOKEN_LOSS_MASK] == datasets.List(datasets.Value("bool"), length=m.max_token_len)
    assert f[schema.ACTIONS] == datasets.List(datasets.Value("float32"), length=m.action_horizon * m.action_dim)
    ours = schema.read_rows(m.shard_paths(demo_shards, "train")[0])
    _assert_same_row(ds["train"][3], ours, 3, m)

    streamed = datasets.load_dataset(str(demo_shards), streaming=True)
    first_val = next(iter(streamed["validation"]))
    _assert_same_row(first_val, schema.read_rows(m.shard_paths(demo_shards, "val")[0]), 0, m)
    assert sum(1 for _ in streamed["train"]) == m.summary["rows_train"]


def test_dataset_card_follows_the_manifest(demo_shards, tmp_path):
    m = Manifest.load(demo_shards)
    card = (demo_shards / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["configs"][0]["data_files"] == [{"split": "train", "path": "shards/train-*.parquet"},
                                                 {"split": "validation", "path": "shards/val-*.parquet"}]
    assert {s["name"]: s["num_examples"] for s in front["dataset_info"]["splits"]} == {
        "train": m.summary["rows_train"], "validation": m.summary["rows_val"]}
    assert m.image_format == "jpeg"  # the default
    assert m.source["repo_id"] in card and f"`image.{m.cameras[0]}` | Image (JPEG)" in card
    # Written from the manifest: PNG shards get a PNG card; no validation split, no validation data files.
    png = dataclasses.replace(m, image_format="png", shards=tuple(m.shard_entries("train")))
    write_card(png, tmp_path)
    other = (tmp_path / "README.md").read_text()
    assert "Image (PNG)" in other and "Image (JPEG)" not in other
    assert [d["split"] for d in yaml.safe_load(other.split("---")[1])["configs"][0]["data_files"]] == ["train"]
