"""The README's "Fine-tuning π0.5 from openpi weights" recipe, run as written on demo data with the tiny preset.

The commands are read from the README section itself (so the test follows the README): the full fine-tune, the LoRA
one, and the full one with the `--grad-accum 2` the section tells to add when memory runs out. Only what names this
machine changes: the shard and checkpoint directories, `--init openpi:` pointing at the tiny openpi checkpoint in
`shared/openpi_reference` (made with openpi's code; its embedding grown to PaliGemma's vocabulary, as the README's
shards need), `--config tiny` for `pi05`; and the harness adds a step count, in-process loading and quick compiles.
The three runs are marked slow (about 2.5 minutes together on 2 cores): `pytest -m slow tests/test_finetune_recipe.py`.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import jax
import numpy as np
import pytest

from test_openpi import PALIGEMMA_VOCAB_SIZE, flat, paligemma_sized_tokenizer, reference, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Fine-tuning π0.5 from openpi weights"
STEPS = 2


def readme_commands() -> tuple[list[list[str]], str]:
    """(each `python -m pipelines.train` command of the README's fine-tuning section as argv after the module name,
    the section's text)."""
    text = (REPO / "README.md").read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command)
            if words[:3] == ["python", "-m", "pipelines.train"]:
                commands.append(words[3:])
    return commands, section


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    assert flag in argv, f"the README's command has no {flag}: {shlex.join(argv)}"
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


@pytest.fixture(scope="module")
def recipe_checkpoint(tmp_path_factory) -> Path:
    """The tiny openpi checkpoint (its weights, its openpi layout) with its token embedding grown from 1024 rows to
    PaliGemma's 257152 (the reference's rows first, random ones after), the vocabulary of every released π0.5
    checkpoint and of the shards the README asks for."""
    import orbax.checkpoint as ocp

    path = reference() / "checkpoint" / "params"
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        arrays = flat(ckptr.restore(path, args=ocp.args.PyTreeRestore(item=meta, restore_args=restore_args))["params"])
    name = "PaliGemma/llm/embedder/input_embedding"
    table = arrays[name]
    extra = np.random.default_rng(0).normal(0, table.std(), (PALIGEMMA_VOCAB_SIZE - len(table), table.shape[1]))
    arrays[name] = np.concatenate([table, extra.astype(np.float32)])
    return write_checkpoint(tmp_path_factory.mktemp("recipe_init") / "pi05_tiny", arrays)


@pytest.fixture(scope="module")
def recipe_shards(demo_dataset, demo_shards, tmp_path_factory) -> Path:
    """The demo dataset preprocessed as the README says for openpi checkpoints: with a text tokenizer of PaliGemma's
    vocabulary layout (the demo's own pieces, padded to PaliGemma's 257152 with unused ones), at the checkpoint's
    image size (32 px)."""
    from conftest import DEMO_REPO_ID, DEMO_SHARD_OPTIONS

    from ki_data.preprocess import PreprocessConfig, run_preprocess

    base = tmp_path_factory.mktemp("recipe_shards")
    tokenizer = paligemma_sized_tokenizer(demo_shards / "tokenizer" / "text.model", base / "tokenizer.model")
    shards = run_preprocess(PreprocessConfig(repo_id=DEMO_REPO_ID, output=str(base / "out"), progress=False,
                                             text_tokenizer=str(tokenizer), **DEMO_SHARD_OPTIONS)).out_dir
    assert json.loads((shards / "manifest.json").read_text())["vocab_size"] == PALIGEMMA_VOCAB_SIZE
    return shards


def _run(argv: list[str], shards: Path, init: Path, out: Path) -> None:
    from pipelines.train import main

    argv = _set(argv, "--shards", str(shards))
    argv = _set(argv, "--checkpoint-dir", str(out))
    argv = _set(argv, "--config", "tiny")
    argv = _set(argv, "--init", f"openpi:{init}")
    harness = ["--steps", str(STEPS), "--save-every", str(STEPS), "--log-every", "1", "--workers", "0",
               "--fast-compile"]
    assert main(argv + harness) == 0, shlex.join(argv + harness)


def _restore(out: Path) -> dict:
    from ki_model import checkpoint as ckpt

    ocp = ckpt._ocp()
    mngr = ckpt.manager(out, read_only=True)
    try:
        assert mngr.latest_step() == STEPS
        items = {"params": ocp.args.StandardRestore(), "opt_state": ocp.args.StandardRestore()}
        return dict(mngr.restore(STEPS, args=ocp.args.Composite(**items)))
    finally:
        mngr.close()


def _leaves(tree) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _trained(out: Path) -> dict:
    """The run's checks that hold for every recipe: it trained the openpi architecture for STEPS steps with finite
    losses and wrote a checkpoint; returns the restored params and optimizer state."""
    from ki_model import checkpoint as ckpt
    from ki_model.train import load_metrics

    metrics = load_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m in metrics:
        for key in ("flow_loss", "fast_loss", "total_loss", "grad_norm"):
            assert m[key] is not None and math.isfinite(m[key]) and m[key] > 0, (key, m)
    config = ckpt.load_model_config(out)
    shapes = json.loads((reference() / "config.json").read_text())["gemma_variants"]
    assert (config.backbone.width, config.expert.width) == (shapes["dummy"]["width"], shapes["dummy_expert"]["width"])
    assert config.remat == "nothing_saveable"  # the recipe's --remat
    return _restore(out)


def test_the_readme_recipe_commands_are_there():
    commands, section = readme_commands()
    assert len(commands) == 2, commands
    assert sum("--lora" in c for c in commands) == 1
    assert "--grad-accum 2" in section
    for argv in commands:
        assert any(a.startswith("openpi:") for a in argv) and "--remat" in argv


@pytest.mark.slow  # ~45 s each on 2 cores: PaliGemma's 257152-token head at batch 32
def test_full_fine_tune_as_in_the_readme(recipe_shards, recipe_checkpoint, tmp_path):
    full = next(c for c in readme_commands()[0] if "--lora" not in c)
    _run(full, recipe_shards, recipe_checkpoint, tmp_path / "full")
    restored = _trained(tmp_path / "full")
    params = _leaves(restored["params"])
    assert all(v.dtype == np.float32 for v in params.values())  # every weight trains, in float32
    moments = [v for v in _leaves(restored["opt_state"]).values() if v.ndim]
    assert sum(v.size for v in moments) == 2 * sum(v.size for v in params.values())  # Adam: two moments each


@pytest.mark.slow  # ~45 s each on 2 cores: PaliGemma's 257152-token head at batch 32
def test_full_fine_tune_with_gradient_accumulation_as_in_the_readme(recipe_shards, recipe_checkpoint, tmp_path):
    full = next(c for c in readme_commands()[0] if "--lora" not in c)
    _run([*full, "--grad-accum", "2"], recipe_shards, recipe_checkpoint, tmp_path / "accum")
    _trained(tmp_path / "accum")
    config = json.loads((tmp_path / "accum" / "train_config.json").read_text())
    assert config["grad_accum"] == 2


@pytest.mark.slow  # ~45 s each on 2 cores: PaliGemma's 257152-token head at batch 32
def test_lora_fine_tune_as_in_the_readme(recipe_shards, recipe_checkpoint, tmp_path):
    from ki_model import checkpoint as ckpt
    from ki_model.lora import is_lora_param

    lora = next(c for c in readme_commands()[0] if "--lora" in c)
    _run(lora, recipe_shards, recipe_checkpoint, tmp_path / "lora")
    restored = _trained(tmp_path / "lora")
    assert ckpt.load_model_config(tmp_path / "lora").lora == (("backbone", 16), ("expert", 32))  # openpi's ranks
    params = _leaves(restored["params"])
    frozen = {k for k, v in params.items() if v.dtype != np.float32}
    trainable = {k for k in params if k not in frozen}
    assert all(params[k].dtype == np.dtype("bfloat16") for k in frozen)
    lora_leaves = {k for k in params if is_lora_param(tuple(re.findall(r"\['([^']+)'\]", k)))}
    assert lora_leaves and lora_leaves <= trainable
    # Trainable: the LoRA factors and, outside the Gemma/SigLIP weights, the action projections and the time MLP.
    assert {k.split("']")[0] + "']" for k in trainable - lora_leaves} == {
        "['action_in_proj']", "['action_out_proj']", "['time_mlp_in']", "['time_mlp_out']"}
    # The optimizer state holds Adam's two moments of the trainable leaves only, none of a frozen one.
    moments = {k: v for k, v in _leaves(restored["opt_state"]).items() if v.ndim}
    assert sum(v.size for v in moments.values()) == 2 * sum(params[k].size for k in trainable)
    for k in moments:
        assert any(k.endswith(t) for t in trainable), k
        assert not any(k.endswith(f) for f in frozen), k
