"""Closed-loop evaluation in gym-pusht: a checkpoint's Policy drives the simulator that recorded the demo data.

From initial states the demo dataset never used (see `ki_sim.pusht.evaluation_reset_seed`), each controller
plays an episode: the policy observes, infers a chunk, executes its first `replan` actions and observes again, up to
the episode limit. The policy acts with its flow head (the action expert) or its FAST head (the backbone alone,
greedy constrained decoding: π0-FAST style). Two baselines play the same initial states: the scripted expert that
recorded the demo data (the yardstick) and hold-still (the agent's current position as every action); both act on
every step without latency, whatever `delay` says.

Latency (`delay` d, in control steps), as on a robot: a chunk is computed from the observation at request time while
the robot goes on executing the previous chunk's next d actions; the new chunk's first d actions stand for time that
has passed and are skipped, so each cycle of `replan` steps executes d old actions, then the new chunk from index d.
The first chunk of an episode is waited for at rest and executed from index 0 (no time passes before the episode
starts). With `rtc` the policy is given the old chunk's remainder and the delay (real-time chunking, ki_model.rtc).
d = 0 is the rollout without latency, step for step.

Per episode: the T's coverage of the target at the start, its maximum and its final value, success (coverage above
gym-pusht's 0.95, which ends the episode), the share of the initial distance between the block's center of mass
and the goal's that the episode closed (negative: pushed away), and for the policy the jump at each chunk boundary
(the new chunk's first executed action against the one the old chunk would have executed then, mean over x and y,
in arena pixels). `run_rollout` writes `rollout_report.json`, a plot
and a GIF of the first episodes (policy beside the expert, the coverage drawn on every frame).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from jaxtyping import Float, UInt8
from tqdm import tqdm

from ki_data.manifest import Manifest
from ki_model.policy import Policy
from ki_sim import pusht
from ki_sim.experts import EXPERTS
from ki_sim.record import DemoConfig

REPORT_FILE = "rollout_report.json"
PLOT_FILE = "rollout_plot.png"
VIDEO_FILE = "rollout.gif"
CONTROLLERS = ("policy", "expert", "hold_still")
HEADS = ("flow", "fast")
SUCCESS_COVERAGE = 0.95  # gym-pusht's success_threshold


class RolloutError(ValueError):
    """A checkpoint that cannot drive gym-pusht (other cameras, state or action sizes), or bad rollout options."""


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    episodes: int = 20
    seed: int = 0  # picks the initial states (evaluation_reset_seed) and the policy's flow noise
    replan: int | None = None  # actions executed per inferred chunk; None: half the horizon
    max_steps: int | None = None  # episode limit; None: the recording's (its sidecar), else the demo default
    video_episodes: int = 3  # episodes shown in the GIF
    controllers: tuple[str, ...] = CONTROLLERS
    head: str = "flow"  # the policy's: "flow" (action expert) or "fast" (the backbone's FAST tokens)
    delay: int = 0  # the policy's latency in control steps (module docstring); at most replan
    rtc: bool = False  # real-time chunking: the flow continues the chunk being executed (flow head only)
    start: str | None = None  # initial states (ki_sim.pusht.STARTS); None: the recording's (its sidecar), else random
    flow_samples: int = 1  # the flow head executes the mean of this many chunks sampled per observation (Policy)

    def validate(self) -> None:
        if self.episodes < 1:
            raise RolloutError(f"episodes must be at least 1, got {self.episodes}")
        if self.delay < 0:
            raise RolloutError(f"delay must be at least 0, got {self.delay}")
        if self.rtc and self.head != "flow":
            raise RolloutError(f"real-time chunking guides the flow head; the {self.head} head has none")
        if self.flow_samples < 1:
            raise RolloutError(f"flow_samples must be at least 1, got {self.flow_samples}")
        if self.flow_samples > 1 and self.head != "flow":
            raise RolloutError(f"flow_samples averages the flow head's samples; the {self.head} head decodes greedily")
        if self.replan is not None and self.replan < 1:
            raise RolloutError(f"replan must be at least 1, got {self.replan}")
        if self.max_steps is not None and self.max_steps < 1:
            raise RolloutError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.head not in HEADS:
            raise RolloutError(f"head must be one of {HEADS}, got {self.head!r}")
        unknown = sorted(set(self.controllers) - set(CONTROLLERS))
        if unknown:
            raise RolloutError(f"unknown controllers {unknown}; known: {list(CONTROLLERS)}")
        pusht.check_seed_range(self.seed, self.episodes)
        if self.start is not None:
            try:
                pusht.check_start(self.start)
            except ValueError as e:
                raise RolloutError(str(e)) from None


@dataclasses.dataclass
class EpisodeResult:
    reset_seed: int
    steps: int
    initial_coverage: float
    max_coverage: float
    final_coverage: float
    success: bool
    initial_distance: float  # the block's center of mass to the goal's, arena pixels
    final_distance: float
    coverage: list[float]  # after every step
    chunk_jumps: list[float] | None = None  # per chunk boundary, arena pixels; None: the controller has no chunks

    @property
    def distance_closed(self) -> float:
        """Share of the initial block-to-goal distance closed (1: on the goal; negative: pushed away)."""
        return 1.0 - self.final_distance / self.initial_distance if self.initial_distance > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"distance_closed": self.distance_closed}


class Controller(Protocol):
    chunk_jumps: list[float] | None  # this episode's jumps at chunk boundaries; None: no chunks

    def reset(self, episode: int) -> None: ...

    def act(self, env: Any, obs: dict[str, np.ndarray]) -> Float[np.ndarray, "k 2"]:
        """The next actions (targets of the agent, arena pixels) to execute before observing again."""


class HoldStill:
    """Every action is the agent's current position: the PD controller holds it; the block never moves."""

    chunk_jumps = None

    def reset(self, episode: int) -> None:
        pass

    def act(self, env: Any, obs: dict[str, np.ndarray]) -> Float[np.ndarray, "1 2"]:
        return np.asarray(obs["agent_pos"], np.float32)[None]


class Expert:
    """The scripted expert that recorded the demo data (ki_sim.experts; its noise seeded per evaluation episode)."""

    chunk_jumps = None

    def __init__(self, seed: int, kind: str = "line"):
        self.seed = seed
        self.kind = kind
        self._pusher: Any = None

    def reset(self, episode: int) -> None:
        # (1, seed, episode): never a recording's (seed, episode) policy stream.
        self._pusher = EXPERTS[self.kind](np.random.default_rng((1, self.seed, episode)))

    def act(self, env: Any, obs: dict[str, np.ndarray]) -> Float[np.ndarray, "1 2"]:
        assert self._pusher is not None, "reset() first"
        return self._pusher.act(env)[None].astype(np.float32)


class PolicyController:
    """Observation -> the frame a recorded demo row came from -> the policy's head -> `replan` actions: with a latency
    of `delay` steps, the old chunk's next `delay` actions, then the new chunk's from index `delay` (module
    docstring). A chunk's index i is the step i after the observation it came from."""

    def __init__(self, policy: Policy, replan: int, head: str = "flow", delay: int = 0, rtc: bool = False):
        horizon = policy.config.action_horizon
        if not 0 <= delay <= replan or replan + delay > horizon:
            raise RolloutError(f"delay {delay} must be in [0, replan {replan}], and replan + delay within the "
                               f"policy's horizon {horizon} (the old chunk covers the delay)")
        self.policy = policy
        self.replan = replan
        self.head = head
        self.delay = delay
        self.rtc = rtc
        self.image_key = pusht_image_key(policy.manifest)
        self._chunk: Float[np.ndarray, "h 2"] | None = None  # the chunk being executed
        self.chunk_jumps: list[float] = []

    def reset(self, episode: int) -> None:
        self._chunk = None
        self.chunk_jumps = []

    def frame(self, env: Any, obs: dict[str, np.ndarray]) -> dict[str, Any]:
        """Exactly what `ki_sim.record.record_demo_dataset` hands to `add_frame` for an observation."""
        return {
            self.image_key: obs["pixels"],
            pusht.STATE_KEY: np.asarray(obs["agent_pos"], dtype=np.float32),
            pusht.ENV_STATE_KEY: pusht.environment_state(env),
            "task": pusht.PUSHT_TASK,
        }

    def infer(self, frame: dict[str, Any], remainder: Float[np.ndarray, "k 2"] | None) -> Float[np.ndarray, "h 2"]:
        if self.head == "fast":
            return self.policy.infer_fast(frame)
        if self.rtc and remainder is not None and len(remainder):
            return self.policy.infer(frame, previous_chunk=remainder, delay=self.delay)
        return self.policy.infer(frame)

    def act(self, env: Any, obs: dict[str, np.ndarray]) -> Float[np.ndarray, "k 2"]:
        old, d = self._chunk, self.delay
        remainder = None if old is None else old[self.replan:]  # not executed yet; row 0 executes next
        chunk = self.infer(self.frame(env, obs), remainder)
        self._chunk = chunk
        if old is None:
            return chunk[: self.replan]
        # At step d after the observation the new chunk takes over from the old one (its last action once it ran out).
        self.chunk_jumps.append(float(np.abs(chunk[d] - old[min(self.replan + d, len(old) - 1)]).mean()))
        return np.concatenate([old[self.replan : self.replan + d], chunk[d : self.replan]])


def pusht_image_key(manifest: Manifest) -> str:
    """The LeRobot key of the policy's one camera, checked against what gym-pusht provides."""
    keys = manifest.camera_keys
    if len(keys) != 1:
        raise RolloutError(f"the checkpoint was trained on cameras {sorted(keys)}; gym-pusht renders one")
    known = (pusht.STATE_KEY, pusht.ENV_STATE_KEY)
    unknown = [k for k in manifest.state_keys if k not in known]
    if unknown or manifest.action_dim != 2:
        raise RolloutError(
            f"the checkpoint's state is {' + '.join(manifest.state_keys)} and its action_dim {manifest.action_dim}; "
            f"gym-pusht provides {' and '.join(known)} and takes the agent's x, y as the action"
        )
    return next(iter(keys.values()))


def run_episode(
    env: Any,
    controller: Controller,
    reset_seed: int,
    episode: int,
    max_steps: int,
    on_frame: Callable[[UInt8[np.ndarray, "s s 3"], float], None] | None = None,
    start: str = "random",
) -> EpisodeResult:
    """One episode from pusht.reset(env, reset_seed, start); on_frame(image, coverage) sees the first and every later
    frame."""
    obs = pusht.reset(env, reset_seed, start)
    cov0, dist0 = pusht.coverage(env), pusht.block_goal_distance(env)
    controller.reset(episode)
    if on_frame is not None:
        on_frame(obs["pixels"], cov0)
    coverage: list[float] = []
    success, done = False, False
    while not done:
        for action in controller.act(env, obs):
            obs, _, terminated, truncated, info = env.step(np.clip(np.asarray(action, np.float32), 0.0, 512.0))
            coverage.append(float(info["coverage"]))
            success = success or bool(info["is_success"])
            if on_frame is not None:
                on_frame(obs["pixels"], coverage[-1])
            done = terminated or truncated or len(coverage) >= max_steps
            if done:
                break
    return EpisodeResult(
        reset_seed=reset_seed,
        steps=len(coverage),
        initial_coverage=cov0,
        max_coverage=max([cov0, *coverage]),
        final_coverage=coverage[-1],
        success=success,
        initial_distance=dist0,
        final_distance=pusht.block_goal_distance(env),
        coverage=coverage,
        chunk_jumps=None if controller.chunk_jumps is None else list(controller.chunk_jumps),
    )


def summarize(results: list[EpisodeResult]) -> dict[str, Any]:
    mx = np.array([r.max_coverage for r in results])
    fin = np.array([r.final_coverage for r in results])
    ok = np.array([r.success for r in results], float)
    closed = np.array([r.distance_closed for r in results])
    jumps = [j for r in results for j in (r.chunk_jumps or [])]
    return {
        # Over every boundary of every episode; None: no chunks, or none replaced before the episodes ended.
        "mean_chunk_jump": float(np.mean(jumps)) if jumps else None,
        "chunk_boundaries": len(jumps),
        "mean_distance_closed": float(closed.mean()),
        "std_distance_closed": float(closed.std()),
        # One episode whose block starts near the goal and ends far from it moves the mean by tens of points.
        "median_distance_closed": float(np.median(closed)),
        "mean_max_coverage": float(mx.mean()),
        "std_max_coverage": float(mx.std()),
        "mean_final_coverage": float(fin.mean()),
        "std_final_coverage": float(fin.std()),
        "success_rate": float(ok.mean()),
        "mean_initial_coverage": float(np.mean([r.initial_coverage for r in results])),
        "mean_steps": float(np.mean([r.steps for r in results])),
        "episodes": [r.to_json() for r in results],
    }


def relative_to_expert(report: dict[str, dict[str, Any]]) -> None:
    """Adds each controller's max coverage and distance closed over the expert's (None without an expert row)."""
    expert = report.get("expert", {}).get("mean_max_coverage")
    closed = report.get("expert", {}).get("mean_distance_closed")
    for r in report.values():
        r["max_coverage_vs_expert"] = r["mean_max_coverage"] / expert if expert else None
        r["distance_closed_vs_expert"] = r["mean_distance_closed"] / closed if closed else None


def initial_state(env: Any, reset_seed: int, start: str = "random") -> tuple[float, ...]:
    """(agent x, y, block x, y, angle) after pusht.reset(env, reset_seed, start)."""
    pusht.reset(env, reset_seed, start)
    u = env.unwrapped
    return (*map(float, u.agent.position), *map(float, u.block.position), float(u.block.angle))


def check_disjoint(env: Any, eval_seeds: list[int], recording: dict[str, Any] | None, start: str = "random") -> str:
    """How the evaluation initial states are known to be unseen; raises when a recorded one comes back."""
    note = (
        f"by construction: recording reset seeds are seed * {pusht.SEED_STRIDE} + episode < "
        f"{pusht.EVAL_SEED_BASE}, evaluation seeds are {pusht.EVAL_SEED_BASE} + seed * "
        f"{pusht.SEED_STRIDE} + episode"
    )
    if recording is None:
        return note + " (the recording's seed file was not found, so not checked against it)"
    recorded = list(recording["reset_seeds"])
    shared = sorted(set(recorded) & set(eval_seeds))
    if shared:
        raise RolloutError(f"evaluation reset seeds {shared[:5]} were used to record the demo dataset")
    states = {initial_state(env, s, recording["start"]) for s in recorded}
    repeated = [s for s in eval_seeds if initial_state(env, s, start) in states]
    if repeated:
        raise RolloutError(f"evaluation seeds {repeated[:5]} give initial states of recorded episodes")
    return note + f"; checked against the {len(recorded)} recorded episodes' seeds and initial states"


def recording_info(manifest: Manifest) -> dict[str, Any] | None:
    """The demo recording's sidecar (reset seeds, episode limit, image size) next to the checkpoint's source dataset."""
    root = manifest.source.get("root")
    return pusht.read_recording(root) if root else None


def source_image_size(manifest: Manifest, recording: dict[str, Any] | None) -> int:
    """The side the recorded frames had (the env must render like the recording); the demo's 96 when unknown."""
    if recording is not None:
        return int(recording["image_size"])
    root = manifest.source.get("root")
    info = Path(root) / "meta" / "info.json" if root else None
    if info is not None and info.is_file():
        key = pusht_image_key(manifest)
        shape = json.loads(info.read_text())["features"].get(key, {}).get("shape")
        if shape:
            return int(shape[0])
    return DemoConfig.image_size


# ------------------------------------------------------------------------------------------------ the run


def run_rollout(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    cfg: RolloutConfig = RolloutConfig(),
    *,
    policy: Policy | None = None,
    progress: bool = True,
    fast_compile: bool = False,
) -> dict[str, Any]:
    """Plays cfg.episodes initial states with each controller; writes the report, plot and GIF into output_dir."""
    cfg.validate()
    t0 = time.perf_counter()
    if policy is None:
        policy = Policy.load(checkpoint_dir, seed=cfg.seed, fast_compile=fast_compile, flow_samples=cfg.flow_samples)
    elif policy.flow_samples != cfg.flow_samples:
        raise RolloutError(f"the policy averages {policy.flow_samples} flow samples, the rollout asks for "
                           f"{cfg.flow_samples}")
    manifest = policy.manifest
    pusht_image_key(manifest)
    recording = recording_info(manifest)
    horizon = policy.config.action_horizon
    replan = cfg.replan or max(1, horizon // 2)
    if replan > horizon:
        raise RolloutError(f"replan {replan} exceeds the policy's horizon {horizon}")
    policy_controller = PolicyController(policy, replan, cfg.head, cfg.delay, cfg.rtc)
    max_steps = cfg.max_steps or (recording or {}).get("max_steps") or DemoConfig.max_steps
    known = recording or pusht.RECORDING_DEFAULTS  # without a sidecar: what recordings before it were
    start, expert = cfg.start or known["start"], known["expert"]
    image_size = source_image_size(manifest, recording)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    env = pusht.make_env(image_size, max_steps=max_steps)
    seeds = [pusht.evaluation_reset_seed(cfg.seed, i) for i in range(cfg.episodes)]
    disjoint = check_disjoint(env, seeds, recording, start)
    controllers: dict[str, Controller] = {
        "policy": policy_controller,
        "expert": Expert(cfg.seed, expert),
        "hold_still": HoldStill(),
    }
    results: dict[str, list[EpisodeResult]] = {name: [] for name in cfg.controllers}
    videos: dict[str, list[list[tuple[np.ndarray, float]]]] = {name: [] for name in cfg.controllers}
    bar = tqdm(total=cfg.episodes * len(cfg.controllers), desc="rollout", unit="episode", disable=not progress)
    try:
        for i, seed in enumerate(seeds):
            for name in cfg.controllers:
                frames: list[tuple[np.ndarray, float]] = []
                keep = i < cfg.video_episodes and name != "hold_still"
                on_frame = (lambda img, c, f=frames: f.append((img, c))) if keep else None
                results[name].append(run_episode(env, controllers[name], seed, i, max_steps, on_frame, start))
                if keep:
                    videos[name].append(frames)
                bar.set_postfix_str(f"{name} ep {i}: max coverage {results[name][-1].max_coverage:.2f}")
                bar.update()
    finally:
        bar.close()
        env.close()

    report: dict[str, Any] = {name: summarize(results[name]) for name in cfg.controllers}
    relative_to_expert(report)
    report["setup"] = {
        "checkpoint": str(checkpoint_dir),
        "episodes": cfg.episodes,
        "seed": cfg.seed,
        "replan": replan,
        "horizon": horizon,
        "max_steps": max_steps,
        "start": start,
        "image_size": image_size,
        "head": cfg.head,
        "delay": cfg.delay,
        "rtc": cfg.rtc,
        "max_guidance_weight": policy.max_guidance_weight if cfg.rtc else None,
        "expert": expert,
        "num_flow_steps": policy.num_steps,
        "flow_samples": cfg.flow_samples,
        "success_coverage": SUCCESS_COVERAGE,
        "reset_seeds": seeds,
        "initial_states_unseen": disjoint,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    plot_rollout(report, cfg.controllers, out / PLOT_FILE)
    shown = [n for n in cfg.controllers if videos[n]]
    if shown:
        write_video([videos[n] for n in shown], shown, out / VIDEO_FILE)
    report["report_path"], report["plot_path"] = str(out / REPORT_FILE), str(out / PLOT_FILE)
    report["video_path"] = str(out / VIDEO_FILE) if shown else None
    return report


def format_table(report: dict[str, Any], controllers: tuple[str, ...] = CONTROLLERS) -> str:
    """The summary as a fixed-width table (mean ± std over episodes, and the median episode's distance closed); the
    policy's row names its head (and the flow samples it averages). Chunk jump: the mean jump at chunk boundaries in
    arena pixels ('-': no chunks)."""
    setup = report.get("setup", {})
    head, samples = setup.get("head", "flow"), setup.get("flow_samples", 1)
    policy = f"policy ({head} head)" if samples == 1 else f"policy ({head}, mean of {samples})"
    lines = [f"{'controller':<24}{'distance closed':>18}{'median':>8}{'vs expert':>11}{'max coverage':>16}"
             f"{'final coverage':>18}{'success':>9}{'chunk jump':>12}"]
    for name in controllers:
        r = report[name]
        vs = r.get("distance_closed_vs_expert")
        jump = r.get("mean_chunk_jump")
        label = policy if name == "policy" else name
        lines.append(
            f"{label:<24}{r['mean_distance_closed']:>11.0%} ± {r['std_distance_closed']:.0%}"
            f"{r['median_distance_closed']:>8.0%}"
            f"{'' if vs is None else f'{vs:>11.0%}'}"
            f"{r['mean_max_coverage']:>9.3f} ± {r['std_max_coverage']:.3f}"
            f"{r['mean_final_coverage']:>11.3f} ± {r['std_final_coverage']:.3f}"
            f"{r['success_rate']:>9.0%}"
            f"{'-' if jump is None else f'{jump:.1f} px':>12}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plot and video


def plot_rollout(report: dict[str, Any], controllers: tuple[str, ...], path: Path) -> None:
    """Left: max coverage per episode for each controller; right: mean coverage over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4))
    n = len(report[controllers[0]]["episodes"])
    width = 0.8 / len(controllers)
    for j, name in enumerate(controllers):
        eps = report[name]["episodes"]
        ax0.bar(np.arange(n) + (j - (len(controllers) - 1) / 2) * width, [e["max_coverage"] for e in eps], width,
                label=f"{name} (mean {report[name]['mean_max_coverage']:.2f})", color=f"C{j}")
        steps = max(len(e["coverage"]) for e in eps)
        # An episode that ended early (success) keeps its last coverage.
        curves = np.array([np.pad(e["coverage"], (0, steps - len(e["coverage"])), mode="edge") for e in eps])
        ax1.plot(np.arange(1, steps + 1), curves.mean(0), color=f"C{j}", label=name)
        ax1.fill_between(np.arange(1, steps + 1), curves.min(0), curves.max(0), color=f"C{j}", alpha=0.1)
    ax0.axhline(SUCCESS_COVERAGE, color="k", ls=":", lw=1)
    ax0.set(xlabel="episode (initial state)", ylabel="max coverage", title="maximum coverage per episode", ylim=(0, 1))
    ax0.legend(fontsize=8)
    ax1.set(xlabel="step (10 per second)", ylabel="coverage", title="coverage over time (mean, min-max band)",
            ylim=(0, 1))
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _annotate(img: UInt8[np.ndarray, "s s 3"], text: str, cov: float, side: int) -> UInt8[np.ndarray, "h w 3"]:
    from PIL import Image, ImageDraw

    pil = Image.fromarray(img).resize((side, side), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (side, side + 30), (255, 255, 255))
    canvas.paste(pil, (0, 30))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), text, fill=(0, 0, 0))
    draw.rectangle((4, 16, 4 + int((side - 8) * min(cov, 1.0)), 25), fill=(40, 160, 40))
    draw.rectangle((4, 16, side - 4, 25), outline=(0, 0, 0))
    draw.text((side // 2 - 20, 15), f"{cov:.0%}", fill=(0, 0, 0))
    return np.asarray(canvas)


def write_video(
    per_controller: list[list[list[tuple[np.ndarray, float]]]], names: list[str], path: Path, side: int = 192
) -> None:
    """A GIF: the first episodes one after another, the controllers side by side, coverage on every frame."""
    from PIL import Image

    frames = []
    for ep in range(min(len(v) for v in per_controller)):
        length = max(len(v[ep]) for v in per_controller)
        for t in range(length):
            panels = []
            for name, v in zip(names, per_controller, strict=True):
                img, cov = v[ep][min(t, len(v[ep]) - 1)]  # a finished episode holds its last frame
                panels.append(_annotate(img, f"{name}  ep {ep}  step {min(t, len(v[ep]) - 1)}", cov, side))
            frames.append(Image.fromarray(np.concatenate(panels, axis=1)))
    if not frames:
        return
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, optimize=False)
