"""Scripted experts for gym-pusht. `act(env)` returns the next target position of the agent (arena pixels).

* `LinePusher` (the demo's): a function of what a policy observes (the agent's position and the block's pose). It
  stands behind the block on the line from the goal through the block's center of mass and pushes along it; to get
  there it circles the block counter-clockwise, always the same way, so that no observation has two right answers.
  It moves the block to the goal and ignores its angle.
* `ContactPlanner` (the harder configuration, the demo's expert before): a greedy contact planner that samples
  contact points along the T's outline, predicts with a quasi-static push model how a short push at each moves the
  block's keypoints toward the goal's, walks there around the block and pushes for a random number of steps. It
  keeps counters and draws random push lengths: not a function of one observation.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float

from ki_sim.pusht import ARENA_HI, ARENA_LO, block_center, goal_center

AGENT_RADIUS = 15.0
# Rotational inertia over mass of gym-pusht's T (both parts use the bar's moment: 2 * 1500).
_RHO2 = 3000.0
# Outline of the T in its body frame (the two boxes of gym_pusht's add_tee, merged).
_T_OUTLINE = [(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120), (-15, 30), (-60, 30)]


def _next_waypoint(start: np.ndarray, goal: np.ndarray, poly) -> np.ndarray:
    """First waypoint of the shortest path from start to goal that keeps the agent off the block."""
    import shapely.geometry as sg

    inner = poly.buffer(AGENT_RADIUS + 2, join_style=2)
    if inner.contains(sg.Point(start)) and not inner.contains(sg.Point(goal)):
        # Touching the block after a push: first step straight away from it.
        near = np.array(poly.exterior.interpolate(poly.exterior.project(sg.Point(start))).coords[0])
        away = start - near
        return start + away / (np.linalg.norm(away) + 1e-6) * 20.0

    def free(a: np.ndarray, b: np.ndarray) -> bool:
        return not sg.LineString([a, b]).intersects(inner)

    if free(start, goal):
        return goal
    corners = np.array(poly.buffer(AGENT_RADIUS + 10, join_style=2).exterior.coords)[:-1]
    nodes = [start, goal] + [np.clip(p, ARENA_LO, ARENA_HI) for p in corners]
    n = len(nodes)
    dist = np.full(n, np.inf)
    dist[0] = 0.0
    prev = [-1] * n
    done = np.zeros(n, bool)
    for _ in range(n):  # Dijkstra on a complete visibility graph of ~10 nodes
        i = int(np.argmin(np.where(done, np.inf, dist)))
        if not np.isfinite(dist[i]) or i == 1:
            break
        done[i] = True
        for j in range(n):
            if not done[j] and free(nodes[i], nodes[j]):
                d = dist[i] + float(np.linalg.norm(nodes[i] - nodes[j]))
                if d < dist[j]:
                    dist[j], prev[j] = d, i
    if not np.isfinite(dist[1]):
        return goal  # boxed in against a wall: go straight and accept a graze
    path = [1]
    while prev[path[-1]] != 0:
        path.append(prev[path[-1]])
    for j in reversed(path):
        if np.linalg.norm(nodes[j] - start) > 8.0:
            return nodes[j]
    return goal


def _contact_candidates(outline: Float[np.ndarray, "k 2"], spacing: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """Points every `spacing` px along the outline (counter-clockwise), with their outward normals."""
    area2 = np.sum(outline[:, 0] * np.roll(outline[:, 1], -1) - np.roll(outline[:, 0], -1) * outline[:, 1])
    ring = outline if area2 > 0 else outline[::-1]
    points, normals = [], []
    for a, b in zip(ring, np.roll(ring, -1, axis=0), strict=True):
        length = float(np.linalg.norm(b - a))
        tangent = (b - a) / length
        s = np.arange(4.0, length - 3.9, spacing)
        points.append(a + s[:, None] * tangent)
        normals.append(np.broadcast_to([tangent[1], -tangent[0]], (len(s), 2)))
    return np.concatenate(points), np.concatenate(normals)


def _distance_to_outline(p: Float[np.ndarray, "m 2"], outline: Float[np.ndarray, "k 2"]) -> Float[np.ndarray, " m"]:
    a, b = outline, np.roll(outline, -1, axis=0)
    ab = b - a
    t = np.clip(np.einsum("mkd,kd->mk", p[:, None] - a[None], ab) / np.sum(ab * ab, axis=1), 0.0, 1.0)
    nearest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(p[:, None] - nearest, axis=-1).min(axis=1)


def _inside(p: Float[np.ndarray, "m 2"], outline: Float[np.ndarray, "k 2"]) -> np.ndarray:
    """Even-odd rule, vectorized over points."""
    a, b = outline, np.roll(outline, -1, axis=0)
    y = p[:, 1:2]
    crosses = (a[None, :, 1] > y) != (b[None, :, 1] > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = a[None, :, 0] + (y - a[None, :, 1]) * (b[None, :, 0] - a[None, :, 0]) / (b[None, :, 1] - a[None, :, 1])
    return (crosses & (p[:, 0:1] < x_at)).sum(axis=1) % 2 == 1


class ContactPlanner:
    """Greedy push planner for gym-pusht. `act(env)` returns the next target position of the agent."""

    def __init__(self, rng: np.random.Generator, push_len: tuple[float, float] = (15.0, 30.0), noise: float = 1.5):
        self.rng = rng
        self.push_len = push_len
        self.noise = noise
        self._push_left = 0
        self._retreat = 0
        self._dir = np.zeros(2)
        self._step = 0.0

    def act(self, env) -> Float[np.ndarray, "2"]:
        import shapely.geometry as sg

        u = env.unwrapped
        agent = np.array(u.agent.position)
        if self._push_left > 0:
            self._push_left -= 1
            if self._push_left == 0:
                self._retreat = 2
            return agent + self._dir * self._step
        if self._retreat > 0:  # back off so the next approach does not drag the block
            self._retreat -= 1
            return agent - self._dir * 12.0

        shapes = u._block_shapes
        keypoints = np.array([u.block.local_to_world(v) for s in shapes for v in s.get_vertices()])
        goal_body = u.get_goal_pose_body(u.goal_pose)
        goal = np.array([goal_body.local_to_world(v) for s in shapes for v in s.get_vertices()])
        outline = np.array([u.block.local_to_world(v) for v in _T_OUTLINE])
        poly = sg.Polygon(outline)
        center = np.array(u.block.position)
        err0 = float(np.sum((goal - keypoints) ** 2))

        contacts, normals = _contact_candidates(outline)
        pre = contacts + normals * (AGENT_RADIUS + 5)
        usable = (
            (pre > ARENA_LO).all(1) & (pre < ARENA_HI).all(1)
            & (_distance_to_outline(pre, outline) >= AGENT_RADIUS + 3)
            & ~_inside(pre, outline)
        )
        push = -normals
        r = contacts - center
        torque = r[:, 0] * push[:, 1] - r[:, 1] * push[:, 0]
        # Quasi-static response of a free body to a 10 px push at each contact: [m, 8, 2] moved keypoints.
        k = 10.0 / (1.0 + torque * torque / _RHO2)
        angle = k * torque / _RHO2
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        rel = keypoints[None] - center
        rotated = np.stack([cos * rel[..., 0] - sin * rel[..., 1], sin * rel[..., 0] + cos * rel[..., 1]], -1)
        moved = center + (k[:, None] * push)[:, None, :] + rotated
        gain = err0 - ((goal[None] - moved) ** 2).sum(axis=(1, 2))
        score = np.where(usable & (gain > 0), gain / 8.0 - 0.5 * np.linalg.norm(pre - agent, axis=1), -np.inf)
        best = None
        if np.isfinite(score).any():
            i = int(np.argmax(score))
            best = (push[i], pre[i])
        if best is None:
            return agent + self.rng.normal(0.0, self.noise, 2)
        push, pre = best
        if np.linalg.norm(pre - agent) < 5.0:
            rmse = np.sqrt(err0 / len(keypoints))
            self._dir = push
            self._push_left = int(self.rng.integers(3, 7))
            self._step = float(min(self.rng.uniform(*self.push_len), 0.6 * rmse + 2.0))
            return agent + push * self._step
        step = np.clip(_next_waypoint(agent, pre, poly), ARENA_LO, ARENA_HI) - agent
        norm = float(np.linalg.norm(step))
        if norm > 40.0:
            step *= 40.0 / norm
        return agent + step + self.rng.normal(0.0, self.noise, 2)


class LinePusher:
    """Push the block's center of mass straight to the goal's, circling the block counter-clockwise to get behind it;
    slowing down near the goal and backing away once there, so that a policy's small errors there do not push the
    block through the goal (the overshoot that undid imitating policies).

    Memoryless: the action depends on the agent's position and the block's pose only (plus optional noise)."""

    def __init__(self, rng: np.random.Generator, noise: float = 1.5, orbit: float = 100.0, push_step: float = 20.0,
                 behind: float = 0.25, step_back: float = 0.7, max_step: float = 40.0, done: float = 10.0,
                 slow: float = 0.3):
        self.rng = rng
        self.noise = noise
        self.orbit = orbit  # circling radius around the block's center of mass: the T reaches 75 px, the agent 15
        self.push_step = push_step  # px per step while pushing
        self.behind = behind  # rad: within this of the pushing position, push
        self.step_back = step_back  # rad: just past the pushing position, step back clockwise instead of circling
        self.max_step = max_step
        self.done = done  # px: the block's center this close to the goal's: back away from the block, then hold still
        self.slow = slow  # near the goal each push moves at most this share of the remaining distance

    def is_done(self, env) -> bool:
        """The block's center is within `done` px of the goal's: from here on the expert only backs away and holds."""
        return float(np.linalg.norm(block_center(env) - goal_center(env))) < self.done

    def act(self, env) -> Float[np.ndarray, "2"]:
        u = env.unwrapped
        agent = np.array(u.agent.position, dtype=np.float64)
        center, goal = block_center(env), goal_center(env)
        away = center - goal
        dist = float(np.linalg.norm(away))
        rel = agent - center
        r = float(np.linalg.norm(rel))
        if dist < self.done:  # done: step away from the block (a policy that errs near the goal retreats, not pushes)
            return agent + rel / max(r, 1e-6) * 10.0 if r < self.orbit else agent
        n = away / dist  # the agent belongs on the far side of the block, pushing along -n
        phi = np.arctan2(rel[1], rel[0])
        to_go = (np.arctan2(n[1], n[0]) - phi + np.pi) % (2 * np.pi) - np.pi  # > 0: the pushing spot is ahead, CCW
        if abs(to_go) < self.behind and r < self.orbit + 25.0:
            lateral = rel - (rel @ n) * n  # drift off the line, corrected while pushing
            target = agent - n * min(self.push_step, max(2.0, self.slow * dist)) - 0.7 * lateral
        else:
            if -self.step_back < to_go < 0:
                turn = max(to_go, -30.0 / max(r, 1.0))
            else:
                turn = min(to_go % (2 * np.pi), 30.0 / max(r, 1.0))  # about 30 px of arc per step
            radius = max(self.orbit, r - 35.0)  # from afar, close in while circling
            target = center + radius * np.array([np.cos(phi + turn), np.sin(phi + turn)])
        step = np.clip(target, ARENA_LO, ARENA_HI) - agent
        norm = float(np.linalg.norm(step))
        if norm > self.max_step:
            step *= self.max_step / norm
        return agent + step + (self.rng.normal(0.0, self.noise, 2) if self.noise else 0.0)


EXPERTS = {"line": LinePusher, "planner": ContactPlanner}
