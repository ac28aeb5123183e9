"""pipelines.train's command line (derived from TrainConfig), the named recipes, and every training command the
README, docs and scripts show: each parses, and the scripts' commands are the recipes they name."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tyro import MISSING

from ki_model.config import PRESETS, preset_optimizer
from ki_model.recipes import RECIPES, RecipeError, recipe
from ki_model.train_config import ModelOptions, TrainConfig
from pipelines.train import main, parse_args

REPO = Path(__file__).resolve().parents[1]
BASE = ["--shards", "s", "--checkpoint-dir", "c"]


# ------------------------------------------------------------------------------------------------ defaults, flags


def test_the_command_line_defaults_are_the_dataclass_defaults():
    for preset in PRESETS:
        cfg, _ = parse_args([*BASE, "--config", preset])
        assert cfg == TrainConfig(shards="s", checkpoint_dir="c", config=preset, optimizer=preset_optimizer(preset))


def test_optimizer_flags_change_one_field_of_the_presets_schedule():
    cfg, _ = parse_args([*BASE, "--config", "pi05", "--peak-lr", "1e-4"])
    assert cfg.optimizer == dataclasses.replace(preset_optimizer("pi05"), peak_lr=1e-4)
    cfg, _ = parse_args([*BASE, "--decay-steps", "300", "--warmup-steps", "7"])
    assert cfg.optimizer == dataclasses.replace(preset_optimizer("tiny"), decay_steps=300, warmup_steps=7)
    assert preset_optimizer("tiny") != preset_optimizer("pi05")  # the tables differ, so the checks above can fail


def test_flags_keep_their_spellings():
    cfg, cmd = parse_args([
        *BASE, "--insulation", "off", "--no-augment", "--workers", "0", "--remat", "--remat-policy", "dots",
        "--layer-chunks", "8", "--lora", "backbone=4", "--init", "ki:DIR", "--flow-samples", "3",
        "--vision-variant", "siglip_tiny_p8", "--dtype", "bfloat16", "--ema-decay", "0.999", "--resume",
        "--grad-accum", "2", "--number-embeddings", "--eval-every", "20", "--log-every", "10", "--fast-compile",
        "--action-horizon", "10", "--wandb", "proj", "--num-processes", "2", "--coordinator-address", "h:1",
        "--process-id", "1",
    ])
    assert cfg.model == ModelOptions(insulation=False, remat=True, remat_policy="dots", layer_chunks=8,
                                     lora="backbone=4", flow_samples=3, vision_variant="siglip_tiny_p8",
                                     dtype="bfloat16")
    assert cfg.model.fields()["remat"] == "dots"  # the policy wins over --remat, as before
    assert (cfg.augment, cfg.num_workers, cfg.init, cfg.ema_decay, cfg.resume, cfg.grad_accum) == \
        (False, 0, "ki:DIR", 0.999, True, 2)
    assert (cfg.number_embeddings, cfg.eval_every, cfg.fast_compile, cfg.action_horizon, cfg.wandb) == \
        (True, 20, True, 10, "proj")
    assert (cmd.dist.num_processes, cmd.dist.coordinator_address, cmd.dist.process_id) == (2, "h:1", 1)


@pytest.mark.parametrize("argv", [
    ["--insulation", "maybe"], ["--config", "huge"], ["--vision-variant", "siglip_huge"], ["--recipe", "nope"],
    ["--num-processes", "2"],  # without --coordinator-address
])
def test_bad_flags_exit_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([*BASE, *argv])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip()


def test_print_config_shows_the_resolved_config_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["--recipe", "demo-stage1", "--checkpoint-dir", str(out), "--steps", "40", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == printed["save_every"] == printed["optimizer"]["decay_steps"] == 40
    assert printed["model"]["flow_loss_weight"] == 0.0 and printed["checkpoint_dir"] == str(out)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ recipes


def test_every_preset_has_an_optimizer():
    for preset in PRESETS:
        assert preset_optimizer(preset).decay_steps > preset_optimizer(preset).warmup_steps


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_resolves_and_passes_the_option_checks(name):
    from ki_model.train import check_options

    given = {f.name: "given" for f in dataclasses.fields(TrainConfig) if getattr(RECIPES[name], f.name) is MISSING}
    cfg = recipe(name, **given).resolved()
    check_options(cfg)
    assert cfg.optimizer.decay_steps is not None and cfg.save_every
    cfg.model.fields()  # every model option maps to a model-config field


def test_a_recipe_names_what_it_leaves_to_the_user():
    with pytest.raises(RecipeError, match="shards, checkpoint_dir, init"):
        recipe("pi05-lora")
    with pytest.raises(RecipeError, match="unknown recipe"):
        recipe("pi06")
    assert recipe("pi05-lora", shards="s", checkpoint_dir="c", init="openpi:p").model.lora == "backbone,expert"


def test_flags_after_a_recipe_change_its_fields_and_nothing_else():
    cfg, _ = parse_args(["--recipe", "demo-stage2", "--insulation", "off", "--steps", "60", "--seed", "3"])
    model = dataclasses.replace(RECIPES["demo-stage2"].model, insulation=False)  # the recipe's other model options
    want = dataclasses.replace(RECIPES["demo-stage2"], model=model, steps=60, seed=3)
    assert cfg == want
    # The run's length carries the decay and the save along (decay_steps / save_every None: the whole run).
    assert (cfg.resolved().optimizer.decay_steps, cfg.resolved().save_every) == (60, 60)
    # ...and a preset named on top of a recipe whose optimizer is the preset's brings its own schedule.
    cfg, _ = parse_args(["--recipe", "pi05-finetune", *BASE, "--init", "openpi:p", "--config", "tiny"])
    assert cfg.optimizer == preset_optimizer("tiny")


def test_the_demo_stages_are_the_ki_recipe():
    s1, s2 = RECIPES["demo-stage1"].resolved(), RECIPES["demo-stage2"].resolved()
    assert s1.model.flow_loss_weight == 0.0 and s1.number_embeddings and not s1.init
    assert s2.model.insulation and s2.model.flow_loss_weight > 0 and not s2.number_embeddings
    assert s2.init == f"ki-backbone:{s1.checkpoint_dir}" and s1.shards == s2.shards
    assert RECIPES["demo-scratch"].steps == s1.steps + s2.steps


# ------------------------------------------------------------------------------------------------ README and docs


def documented_train_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after the module name) of every concrete `python -m pipelines.train ...` in README.md and docs/:
    lines of fenced code blocks (joined across backslash continuations, shell comments dropped) and inline code; the
    synopsis of the command table (its [optional] parts) is not a command."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        snippets, block = [], None
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("```"):
                if block is not None:
                    snippets += "\n".join(block).replace("\\\n", " ").splitlines()
                block = None if block is not None else []
            elif block is not None:
                block.append(line)
            else:
                snippets += re.findall(r"`([^`]*pipelines\.train[^`]*)`", line)
        for snippet in snippets:
            start = snippet.find("python -m pipelines.train ")
            if start < 0 or "[" in snippet:
                continue
            found.append((f"{path.name}: {snippet.strip()}", shlex.split(snippet[start:], comments=True)[3:]))
    return found


def test_every_documented_train_command_parses():
    commands = documented_train_commands()
    assert len(commands) >= 5, commands  # the fine-tune, PaliGemma, openpi and multi-host commands at least
    for where, argv in commands:
        try:
            parse_args(argv)
        except SystemExit as e:  # pragma: no cover - the message names the command
            pytest.fail(f"{where}: does not parse (exit {e.code})")


def test_every_flag_the_readme_gives_for_training_exists(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    flags = set(re.findall(r"--[a-z][a-z0-9-]*", capsys.readouterr().out))
    row = next(line for line in (REPO / "README.md").read_text().splitlines()
               if line.startswith("| `python -m pipelines.train"))
    named = set(re.findall(r"--[a-z][a-z0-9-]*", row))
    assert len(named) >= 15 and named <= flags, sorted(named - flags)


def test_the_readme_fine_tune_commands_are_the_fine_tune_recipes():
    from test_finetune_recipe import readme_commands

    for argv in readme_commands()[0]:
        cfg, _ = parse_args(argv)
        name = "pi05-lora" if "--lora" in argv else "pi05-finetune"
        assert cfg == recipe(name, shards=cfg.shards, checkpoint_dir=cfg.checkpoint_dir, init=cfg.init,
                             optimizer=preset_optimizer("pi05")), name


# ------------------------------------------------------------------------------------------------ the scripts

FAKE_PYTHON = """#!/usr/bin/env bash
# Records every `-m pipelines.train` command line; runs `-c` snippets for real; every other step does nothing.
if [ "$1" = -m ] && [ "$2" = pipelines.train ]; then
  shift 2
  "$REAL_PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$TRAIN_LOG"
  for ((i = 1; i < $#; i++)); do  # the run directory exists afterwards, as after a real run
    if [ "${!i}" = --checkpoint-dir ]; then j=$((i + 1)); mkdir -p "${!j}"; fi
  done
elif [ "$1" = -c ]; then
  PYTHONPATH="$REPO" exec "$REAL_PYTHON" "$@"
fi
"""


def record_train_commands(repo: Path, script: str, workdir: Path, env: dict[str, str] | None = None) -> list[list[str]]:
    """The `pipelines.train` command lines (argv after the module name) that `repo`'s scripts/`script` runs, with a
    stand-in .venv/bin/python in a scratch copy of the scripts: nothing is set up, recorded or trained."""
    shutil.copytree(repo / "scripts", workdir / "scripts")
    (workdir / "scripts" / "setup_venv.sh").write_text("")
    python = workdir / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    (workdir / "runs" / "demo" / "checkpoint" / "rollout_fast").mkdir(parents=True)
    (workdir / "runs" / "demo" / "checkpoint" / "metrics.jsonl").write_text("")
    log = workdir / "train_commands.jsonl"
    env = {**os.environ, "REAL_PYTHON": sys.executable, "TRAIN_LOG": str(log), "REPO": str(repo), **(env or {})}
    proc = subprocess.run(["bash", f"scripts/{script}"], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


def _recipe_and_changes(argv: list[str]) -> tuple[str, dict]:
    """The recipe a command names and the fields its other flags change."""
    cfg, cmd = parse_args(argv)
    assert cmd.recipe, f"a script trains without a recipe: {shlex.join(argv)}"
    base = RECIPES[cmd.recipe]
    return cmd.recipe, {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                        if getattr(cfg, f.name) != getattr(base, f.name)}


def test_demo_sh_trains_the_two_demo_recipes(tmp_path):
    commands = record_train_commands(REPO, "demo.sh", tmp_path / "plain")
    assert [_recipe_and_changes(c) for c in commands] == [("demo-stage1", {}), ("demo-stage2", {})]
    # The step counts of the environment change the length, the decay and the last save of each stage.
    commands = record_train_commands(REPO, "demo.sh", tmp_path / "env",
                                     {"DEMO_STAGE1_STEPS": "7", "DEMO_STEPS": "9", "DEMO_SEED": "4"})
    assert [_recipe_and_changes(c) for c in commands] == [("demo-stage1", {"steps": 7, "seed": 4}),
                                                         ("demo-stage2", {"steps": 9, "seed": 4})]
    resolved = [parse_args(c)[0].resolved() for c in commands]
    assert [(r.optimizer.decay_steps, r.save_every) for r in resolved] == [(7, 7), (9, 9)]


def test_demo_sh_trains_on_the_shards_it_makes_and_evaluates_what_it_trains():
    script = (REPO / "scripts" / "demo.sh").read_text()
    out = re.search(r"^out=(\S+)$", script, flags=re.M).group(1)
    assert '--output "$out/shards"' in script and 'ckpt="$out/checkpoint"' in script
    # The evaluation and both rollouts (scripts/evaluate_run.sh, which ki_compare.sh runs on every run too) read the
    # checkpoint stage 2 wrote and land inside it (their default output), where pipelines.compare_runs looks.
    assert re.search(r'^bash scripts/evaluate_run\.sh "\$ckpt" "\$out/shards" \d+$', script, flags=re.M)
    assert 'bash scripts/evaluate_run.sh "$1" "$demo/shards" 0' in (REPO / "scripts" / "ki_compare.sh").read_text()
    shared = (REPO / "scripts" / "evaluate_run.sh").read_text()
    tools = re.findall(r"^ *\$py -m pipelines\.(evaluate|rollout) (.*?(?:\\\n.*)*)$", shared, flags=re.M)
    assert [t for t, _ in tools] == ["evaluate", "rollout", "rollout"]
    assert all('--checkpoint "$ckpt"' in args and "--output" not in args for _, args in tools)
    assert re.search(r"--head flow --flow-samples 8", tools[1][1]) and "--head fast" in tools[2][1]
    assert RECIPES["demo-stage1"].shards == RECIPES["demo-stage2"].shards == f"{out}/shards"
    assert RECIPES["demo-stage2"].checkpoint_dir == f"{out}/checkpoint"


@pytest.mark.slow  # 23 s: every run of the script, dry
def test_ki_compare_sh_runs_are_the_recipes_with_one_change_each(tmp_path):
    commands = record_train_commands(REPO, "ki_compare.sh", tmp_path / "w", {"COMPARE_SEEDS": "1"})
    got = [_recipe_and_changes(c) for c in commands]
    s1, s2 = RECIPES["demo-stage1"].steps, RECIPES["demo-stage2"].steps
    off = dataclasses.replace(RECIPES["demo-stage2"].model, insulation=False)  # demo-scratch shares it
    assert RECIPES["demo-scratch"].model == RECIPES["demo-stage2"].model
    assert got == [
        ("demo-stage2", {"checkpoint_dir": "runs/compare/b_stage1_off", "model": off}),
        ("demo-scratch", {"checkpoint_dir": "runs/compare/c_scratch_off", "model": off}),
        ("demo-scratch", {"checkpoint_dir": "runs/compare/d_scratch_ki"}),
        ("demo-stage1", {"checkpoint_dir": "runs/compare/a_seed1/stage1", "seed": 1}),
        ("demo-stage2", {"checkpoint_dir": "runs/compare/a_seed1/checkpoint",
                         "init": "ki-backbone:runs/compare/a_seed1/stage1", "seed": 1}),
        ("harder", {}),
    ]
    assert [parse_args(c)[0].steps for c in commands] == [s2, s1 + s2, s1 + s2, s1, s2, s1 + s2]
