"""Issue 6: the inspection library, the terminal view and the notebook, on shards the tests make."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from ki_data import FastDecodeError
from ki_data import inspect as ki_inspect
from ki_data import inspect_plots, inspect_render
from ki_data.normalize import unnormalize
from ki_data.artifacts import DataArtifacts
from pipelines import inspect as inspect_cli

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "inspect_tokens.ipynb"


@pytest.fixture(scope="module")
def shards(demo_shards) -> DataArtifacts:
    return ki_inspect.open_shards(demo_shards)


@pytest.fixture(scope="module")
def known(shards) -> ki_inspect.Row:
    """A row in the middle of the first train episode (real steps ahead, so a full chunk)."""
    episode = shards.manifest.splits["train"][0]
    return ki_inspect.load_row(shards, episode=episode, frame=3)


def test_load_row_by_episode_frame_and_by_index_agree(shards, known):
    assert (known.episode_index, known.frame_index) == (shards.manifest.splits["train"][0], 3)
    same = ki_inspect.load_row(shards, index=known.index)
    assert (same.episode_index, same.frame_index) == (known.episode_index, known.frame_index)
    np.testing.assert_array_equal(same.tokenized_prompt, known.tokenized_prompt)
    assert known.actions.shape == (shards.manifest.action_horizon, shards.manifest.action_dim)
    assert set(known.decoded_images()) == set(list(shards.manifest.cameras))
    size = shards.manifest.image_size
    assert all(img.shape == (size, size, 3) for img in known.decoded_images().values())


def test_load_row_names_what_is_missing(shards, tmp_path):
    episode = shards.manifest.splits["train"][0]
    with pytest.raises(ki_inspect.InspectError, match=f"episode {episode} has no frame 100000"):
        ki_inspect.load_row(shards, episode=episode, frame=100000)
    with pytest.raises(ki_inspect.InspectError, match="no shard holds episode 987654"):
        ki_inspect.load_row(shards, episode=987654)
    with pytest.raises(ki_inspect.InspectError, match="no shard holds index -5"):
        ki_inspect.load_row(shards, index=-5)
    with pytest.raises(ki_inspect.InspectError, match="no manifest.json"):
        ki_inspect.open_shards(tmp_path)


def test_token_table_matches_the_row_and_the_tokenizers(shards, known):
    records = ki_inspect.token_table(shards, known)
    assert [r.position for r in records] == list(range(shards.manifest.max_token_len))
    np.testing.assert_array_equal([r.token_id for r in records], known.tokenized_prompt)
    for name in ("tokenized_prompt_mask", "token_ar_mask", "token_loss_mask"):
        np.testing.assert_array_equal([getattr(r, name) for r in records], getattr(known, name))
    n_text = shards.manifest.max_text_len
    np.testing.assert_array_equal([r.text_id for r in records[:n_text]], known.text_prompt)
    np.testing.assert_array_equal([r.text_prompt_mask for r in records[:n_text]], known.text_prompt_mask)
    assert all(r.text_id is None for r in records[n_text:])

    # The prefix reads as the prompt built from the row's own task and state, piece by piece.
    text = shards.prompt.text
    prefix = [r for r in records if r.segment == "prefix"]
    assert len(prefix) == known.text_prompt_mask.sum()
    assert prefix[0].piece == text.id_to_piece(text.bos_id)
    assert text.decode([r.token_id for r in prefix]) == shards.prompt.prefix_text(known.task, known.state)
    assert [r.piece for r in prefix] == [text.id_to_piece(i) for i in known.text_prompt[: len(prefix)]]

    # The postfix: the layout's start ("Action: " pieces under `fast`, nothing under `pi05`, whose prefix ends with
    # them), then the FAST ids of the stored chunk, then "|" and EOS.
    postfix = [r for r in records if r.segment == "postfix"]
    fast_ids = shards.prompt.fast.encode(known.actions)
    fast = [r for r in postfix if r.kind == "fast"]
    assert [r.piece for r in fast] == [f"FAST#{f}" for f in fast_ids]
    assert all(r.token_loss_mask and r.token_ar_mask for r in fast)
    head = postfix[: postfix.index(fast[0])]
    assert [r.token_id for r in head] == list(shards.prompt.start_ids)
    assert text.decode([r.token_id for r in prefix + head]).endswith("Action: ")
    assert postfix[-1].token_id == text.eos_id and postfix[-1].piece == text.id_to_piece(text.eos_id)
    assert text.decode([postfix[-2].token_id]).strip() == "|"
    assert len(prefix) + len(postfix) == known.tokenized_prompt_mask.sum()
    assert all(r.segment == "pad" and r.kind == "pad" for r in records[len(prefix) + len(postfix) :])

    frame = ki_inspect.token_table_frame(records)
    assert list(frame.index) == list(range(shards.manifest.max_token_len))
    assert (frame["segment"] == "postfix").sum() == len(postfix)


def test_fast_postfix_decodes_to_the_stored_chunk(shards, known):
    decode = ki_inspect.decode_fast_postfix(shards, known)
    assert decode.fast_ids == shards.prompt.fast.encode(known.actions)
    assert decode.decoded.shape == (shards.manifest.action_horizon, shards.manifest.action_dim)
    scale = shards.prompt.fast.scale
    # Rounding each DCT coefficient moves it by at most 0.5/scale; the orthonormal inverse keeps the RMS.
    assert np.sqrt(np.mean((decode.decoded - decode.stored) ** 2)) <= 0.5 / scale + 1e-6
    assert decode.max_error <= decode.bound
    stats = shards.norm_stats["actions"]
    np.testing.assert_allclose(decode.stored_actions, unnormalize(known.actions, stats), rtol=1e-6)
    # In data units the error scales by half the q01..q99 width of each dimension.
    half_width = (stats.q99 - stats.q01) / 2
    assert np.all(decode.max_action_error <= decode.bound * half_width + 1e-4)


def test_row_check_passes_a_real_row_and_names_corruptions(shards, known):
    ki_inspect.check_row_consistency(shards, known)
    assert ki_inspect.row_problems(shards, known) == []

    first_postfix = int(np.flatnonzero(known.token_ar_mask)[0])
    ar = known.token_ar_mask.copy()
    ar[first_postfix] = False
    with pytest.raises(ki_inspect.RowInconsistencyError, match="text_prompt has .* real tokens but the tokenized_prompt"):
        ki_inspect.check_row_consistency(shards, known.replace(token_ar_mask=ar))

    # Swap two FAST ids: still decodes, but no longer to the stored chunk / what build_prompt makes.
    tokens = known.tokenized_prompt.copy()
    fast_pos = np.flatnonzero(shards.prompt.is_fast(tokens) & known.token_ar_mask)
    assert len(fast_pos) >= 2
    tokens[fast_pos[0]] = tokens[fast_pos[-1]]
    problems = ki_inspect.row_problems(shards, known.replace(tokenized_prompt=tokens))
    assert any("tokenized_prompt differs from the prompt builder" in p for p in problems)

    # A text id among the FAST ids: the postfix grammar breaks, and the reading (the route evaluation uses) says so.
    tokens = known.tokenized_prompt.copy()
    tokens[fast_pos[1]] = known.tokenized_prompt[0]
    broken = known.replace(tokenized_prompt=tokens)
    with pytest.raises(FastDecodeError, match="break the postfix grammar"):
        ki_inspect.decode_fast_postfix(shards, broken)
    assert any(p.startswith("FAST postfix does not decode: the tokens break") for p in ki_inspect.row_problems(shards, broken))

    text = known.text_prompt.copy()
    text[1] = (text[1] + 1) % shards.prompt.text.vocab_size
    with pytest.raises(ki_inspect.RowInconsistencyError, match="differ at position 1"):
        ki_inspect.check_row_consistency(shards, known.replace(text_prompt=text))


def test_terminal_view_shows_the_known_row(shards, known, capsys):
    code = inspect_cli.main(
        [str(shards.root), "--episode", str(known.episode_index), "--frame", str(known.frame_index),
         "--color", "never", "--check"]
    )
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert f"episode={known.episode_index}  frame={known.frame_index}  index={known.index}" in lines[0]
    assert f"task: {known.task!r}" in out
    text = shards.prompt.text
    # Every real position is one line: position, segment, id, piece, text id, text piece, four masks.
    records = ki_inspect.token_table(shards, known)
    for r in records[: int(known.tokenized_prompt_mask.sum())]:
        fields = next(line.split() for line in lines if line.split()[:1] == [str(r.position)])
        assert fields[1:3] == [r.segment, str(r.token_id)], fields
    bos_line = next(line for line in lines if line.startswith("0 "))
    assert text.id_to_piece(text.bos_id) in bos_line
    fast_pieces = [f"FAST#{f}" for f in shards.prompt.fast.encode(known.actions)]
    positions = [out.index(p + " ") for p in fast_pieces]
    assert positions == sorted(positions)  # in order
    assert "---- postfix" in out and "---- pad" in out
    assert out.index("---- postfix") < positions[0]
    assert "row check: consistent" in out


def test_terminal_view_by_index_and_its_errors(shards, known, capsys):
    assert inspect_cli.main([str(shards.root), "--index", str(known.index), "--color", "never", "--stats"]) == 0
    out = capsys.readouterr().out
    assert f"episode={known.episode_index}  frame={known.frame_index}" in out
    assert '"max_token_len": %d' % shards.manifest.max_token_len in out
    assert inspect_cli.main([str(shards.root), "--episode", "987654"]) == 2
    assert "no shard holds episode 987654" in capsys.readouterr().err


def test_terminal_view_in_colour_and_with_a_limit(shards, known):
    records = ki_inspect.token_table(shards, known)
    coloured = inspect_render.rendered_token_table(records, color="always")
    assert "\x1b[35m" in coloured  # FAST ids in magenta
    assert "\x1b[36m" in coloured  # prefix in cyan
    first_fast = next(r for r in records if r.kind == "fast")
    assert first_fast.piece in coloured
    plain = inspect_render.token_table_text(records, limit=5)
    assert len([ln for ln in plain.splitlines() if ln[:1].isdigit()]) == 5
    assert f"... {shards.manifest.max_token_len - 5} more positions not shown" in plain


def test_html_table_colours_prefix_postfix_and_fast(shards, known):
    records = ki_inspect.token_table(shards, known)
    shown, hidden = inspect_render.visible_records(records, pad_rows=1)
    assert hidden == shards.manifest.max_token_len - int(known.tokenized_prompt_mask.sum()) - 1
    html = inspect_render.style_token_table(ki_inspect.token_table_frame(shown)).to_html()
    for colour in inspect_render.HTML_BACKGROUND.values():
        assert colour in html
    assert "FAST#" in html and "border-top: 3px solid" in html


def test_dataset_token_stats(shards, known):
    stats = ki_inspect.dataset_token_stats(shards, progress=False)
    assert stats.rows == sum(s.rows for s in shards.manifest.shards)
    i = int(np.flatnonzero(stats.index == known.index)[0])
    assert stats.prompt_length[i] == known.tokenized_prompt_mask.sum()
    assert stats.text_length[i] == known.text_prompt_mask.sum()
    assert stats.fast_tokens[i] == len(shards.prompt.fast.encode(known.actions))
    # Every postfix holds the same fixed text around its FAST ids.
    fixed = stats.prompt_length - stats.text_length - stats.fast_tokens
    assert len(np.unique(fixed)) == 1 and fixed[0] == len(shards.prompt.start_ids) + len(shards.prompt.end_ids)
    ki_inspect.check_token_stats(stats)
    # Preprocessing counted the same things on its own.
    summary = shards.manifest.summary
    assert stats.fast_tokens.max() == summary["fast_tokens_per_chunk"]["max"]
    assert np.isclose(stats.fast_tokens.mean(), summary["fast_tokens_per_chunk"]["mean"])
    assert stats.prompt_length.max() == summary["prompt_tokens"]["max"]

    longest = stats.near_limit(fraction=0.0, top=3)
    assert [r["prompt_length"] for r in longest] == sorted(stats.prompt_length, reverse=True)[:3]
    assert longest[0]["free"] == stats.max_token_len - stats.prompt_length.max()
    assert stats.near_limit(fraction=1.01) == []
    assert stats.summary()["max_fill"] == round(float(stats.prompt_length.max() / stats.max_token_len), 3)


def test_figures_plot_what_they_say(shards, known):
    decode = ki_inspect.decode_fast_postfix(shards, known)
    fig = inspect_plots.fast_decode_figure(decode)
    ax = fig.axes[0]
    stored, decoded = (line.get_ydata() for line in ax.get_lines()[:2])
    np.testing.assert_allclose(stored, decode.stored_actions[:, 0])
    np.testing.assert_allclose(decoded, decode.decoded_actions[:, 0])
    assert len([a for a in fig.axes if a.get_visible()]) == shards.manifest.action_dim

    stats = ki_inspect.dataset_token_stats(shards, progress=False)
    fig = inspect_plots.token_stats_figure(stats)
    limit_lines = [ln for ln in fig.axes[1].get_lines() if ln.get_label().startswith("max_token_len")]
    assert limit_lines and limit_lines[0].get_xdata()[0] == shards.manifest.max_token_len

    cams = inspect_plots.camera_figure(known.decoded_images())
    assert [a.get_title().split()[0] for a in cams.axes] == list(shards.manifest.cameras)


def test_notebook_paths(tmp_path):
    shards, ckpt = ki_inspect.notebook_paths({"KI_SHARDS": str(tmp_path), "KI_CHECKPOINT": ""})
    assert shards == tmp_path and ckpt is None
    shards, ckpt = ki_inspect.notebook_paths({"KI_SHARDS": "runs/x", "KI_CHECKPOINT": "runs/c"})
    assert shards == REPO / "runs" / "x" and ckpt == REPO / "runs" / "c"
    shards, _ = ki_inspect.notebook_paths({})
    assert shards == REPO / "runs" / "demo" / "shards"


def venv_kernel(tmp_path: Path) -> KernelManager:
    """A kernel running this very interpreter, whatever kernels the user has (or has not) registered."""
    spec = tmp_path / "kernels" / "ki-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "ki", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(spec.parent)], ensure_native_kernel=False)
    return KernelManager(kernel_name="ki-test", kernel_spec_manager=ksm, transport="ipc",
                         ip=str(tmp_path / "kernel-ipc"))


def run_notebook(shards_dir: Path, checkpoint: Path | None, tmp_path: Path, monkeypatch) -> list:
    """Executes the notebook (as saved: no outputs) in a fresh kernel; returns every cell output."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "notebook saved with outputs"
    monkeypatch.setenv("KI_SHARDS", str(shards_dir))
    monkeypatch.setenv("KI_CHECKPOINT", str(checkpoint or ""))  # empty: none, never the demo's
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # The kernel imports ki_data from this checkout even when the package is not installed in editable mode.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    client = NotebookClient(nb, km=venv_kernel(tmp_path), timeout=300, resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError on any failing cell (check_row_consistency included)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def pngs(outputs: list) -> int:
    return len([o for o in outputs if "image/png" in o.get("data", {})])


def test_notebook_runs_top_to_bottom(demo_shards, tmp_path, monkeypatch):
    outputs = run_notebook(demo_shards, None, tmp_path, monkeypatch)
    assert pngs(outputs) == 3  # cameras, FAST decode, dataset histograms (no checkpoint: no prediction plot)
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "FAST#" in html and inspect_render.HTML_BACKGROUND["prefix"] in html
    text = "".join(o.get("text", "") for o in outputs)
    assert "no checkpoint" in text and str(demo_shards) in text


@pytest.mark.slow
def test_model_predictions_from_a_checkpoint(shards, known, trained_checkpoint):
    from ki_model.evaluate import predict_row
    from ki_model.policy import Policy

    pred = predict_row(Policy.load(trained_checkpoint), known.as_batch())
    horizon_dim = (shards.manifest.action_horizon, shards.manifest.action_dim)
    assert pred.truth.shape == pred.flow.shape == horizon_dim
    np.testing.assert_allclose(pred.truth, unnormalize(known.actions, shards.norm_stats["actions"]), rtol=1e-6)
    assert np.isfinite(pred.flow).all()
    # Constrained greedy decoding always yields exactly horizon x dim coefficients, so the FAST head decodes.
    assert pred.fast_error is None and pred.fast is not None and pred.fast.shape == horizon_dim
    np.testing.assert_allclose(
        pred.fast,
        unnormalize(shards.prompt.fast.decode(pred.fast_ids, *horizon_dim), shards.norm_stats["actions"]),
        rtol=1e-5,
    )
    errors = pred.errors()
    assert errors["flow_mae"] > 0 and errors["fast_mae"] > 0
    fig = inspect_plots.predictions_figure(pred)
    np.testing.assert_allclose(fig.axes[0].get_lines()[1].get_ydata(), pred.flow[:, 0])


@pytest.mark.slow
def test_notebook_shows_predictions_with_a_checkpoint(demo_shards, trained_checkpoint, tmp_path, monkeypatch):
    outputs = run_notebook(demo_shards, trained_checkpoint, tmp_path, monkeypatch)
    assert pngs(outputs) == 4  # ... and the model's predictions
    assert "flow_mae" in "".join(o.get("text", "") for o in outputs)
