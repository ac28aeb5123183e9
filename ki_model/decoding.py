"""Constrained FAST decoding: the postfix grammar ([`Action: `] FAST.. `|` EOS) as a jax state machine.

A decoded sequence is valid when it is exactly: the action-prefix ids (`Action: ` under the `fast` prompt layout,
none under `pi05`), then FAST ids whose coefficient counts sum to horizon × dim, then the end ids. The ids come from
`ki_data.PromptBuilder.grammar()`, and so does the table of coefficients per FAST id (in model ids): nothing here
recomputes it. Turning valid tokens back into actions is the prompt builder's too (`read_postfix`).

`DecodeState` tracks every row through that grammar during decoding; in constrained
mode `allowed_tokens` only admits tokens that keep the row valid and able to finish (a FAST id expanding to one
coefficient must exist, so any remaining count can be filled), hence every constrained sequence decodes.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from ki_data.prompt import PostfixGrammar

PREFIX, FAST, END = 0, 1, 2


class FastSpecError(ValueError):
    """A grammar that cannot drive constrained decoding (no FAST id of one coefficient to finish with)."""


# Not checked at run time (the annotations stay as documentation): nnx.jit rebuilds this pytree through __init__
# with None leaves (flax.nnx.extract.clear_non_graph_nodes).
@typing.no_type_check
@struct.dataclass
class FastDecodeSpec:
    """Token grammar of the FAST postfix in model ids (a pytree: the arrays are leaves, the ints static)."""

    # numpy when built; jax arrays once passed through a transform as a pytree
    action_prefix_ids: Int[np.ndarray, " p"] | Int[Array, " p"]
    end_ids: Int[np.ndarray, " e"] | Int[Array, " e"]
    # coefficients each model id expands to; 0 = not a FAST id
    coeffs_per_model_id: Int[np.ndarray, " vocab"] | Int[Array, " vocab"]
    horizon: int = struct.field(pytree_node=False)
    action_dim: int = struct.field(pytree_node=False)

    @property
    def total_coefficients(self) -> int:
        return self.horizon * self.action_dim

    @property
    def vocab_size(self) -> int:
        return self.coeffs_per_model_id.shape[0]

    @property
    def max_decode_steps(self) -> int:
        """Steps after which a constrained decode has surely finished (every FAST token one coefficient)."""
        return len(self.action_prefix_ids) + self.total_coefficients + len(self.end_ids)

    @classmethod
    def from_grammar(cls, grammar: PostfixGrammar, horizon: int, dim: int) -> FastDecodeSpec:
        """From `ki_data.PromptBuilder.grammar()`: the very ids and FAST id table the training prompts were built
        with (the grammar has already checked that the ids fit the vocabulary and do not collide)."""
        if not np.any(np.asarray(grammar.fast_coefficients) == 1):
            raise FastSpecError("no FAST id expands to exactly one coefficient: constrained decoding could get stuck")
        return cls(
            action_prefix_ids=np.asarray(grammar.start_ids, np.int32),
            end_ids=np.asarray(grammar.end_ids, np.int32),
            coeffs_per_model_id=grammar.coefficients_per_model_id,
            horizon=horizon,
            action_dim=dim,
        )


@struct.dataclass
class DecodeState:
    """Where each row stands in the grammar."""

    phase: Int[Array, " b"]  # PREFIX, FAST or END
    count: Int[Array, " b"]  # tokens emitted inside the current PREFIX / END phase
    total: Int[Array, " b"]  # coefficients emitted so far
    done: Bool[Array, " b"]  # finished or broke the grammar; emits nothing more
    valid: Bool[Array, " b"]  # grammar kept so far (and, once done, completed)

    @classmethod
    def initial(cls, spec: FastDecodeSpec, batch: int) -> DecodeState:
        zeros = jnp.zeros((batch,), jnp.int32)
        phase = PREFIX if len(spec.action_prefix_ids) else FAST
        return cls(zeros + phase, zeros, zeros, jnp.zeros((batch,), bool), jnp.ones((batch,), bool))


def _expected(ids: Int[np.ndarray, " p"] | Int[Array, " p"], count: Int[Array, " b"]) -> Int[Array, " b"]:
    ids = jnp.asarray(ids, jnp.int32)
    if ids.shape[0] == 0:
        return jnp.zeros_like(count)
    return ids[jnp.clip(count, 0, ids.shape[0] - 1)]


def allowed_tokens(spec: FastDecodeSpec, state: DecodeState) -> Bool[Array, "b vocab"]:
    """Tokens that keep each row inside the grammar and able to end at exactly horizon × dim coefficients."""
    coeffs = jnp.asarray(spec.coeffs_per_model_id)
    vocab = jnp.arange(coeffs.shape[0])[None, :]
    target = spec.total_coefficients
    forced_prefix = vocab == _expected(spec.action_prefix_ids, state.count)[:, None]
    forced_end = vocab == _expected(spec.end_ids, jnp.where(state.phase == END, state.count, 0))[:, None]
    fits = (coeffs[None, :] > 0) & (state.total[:, None] + coeffs[None, :] <= target)
    in_fast = jnp.where((state.total < target)[:, None], fits, forced_end)
    allowed = jnp.where(
        (state.phase == PREFIX)[:, None], forced_prefix, jnp.where((state.phase == FAST)[:, None], in_fast, forced_end)
    )
    return allowed | state.done[:, None]  # finished rows: anything (they are masked to padding anyway)


def advance(spec: FastDecodeSpec, state: DecodeState, tok: Int[Array, " b"]) -> DecodeState:
    """Move every active row past the token it just emitted."""
    coeffs = jnp.asarray(spec.coeffs_per_model_id)
    n_prefix, n_end, target = len(spec.action_prefix_ids), len(spec.end_ids), spec.total_coefficients
    c = coeffs[tok]
    end0 = _expected(spec.end_ids, jnp.zeros_like(tok))

    # PREFIX: the forced prefix ids one by one.
    ok_p = tok == _expected(spec.action_prefix_ids, state.count)
    count_p = state.count + 1
    phase_p = jnp.where(count_p >= n_prefix, FAST, PREFIX)
    count_p = jnp.where(count_p >= n_prefix, 0, count_p)
    # FAST: FAST ids while the total stays within target; the first end id once it is reached exactly.
    is_fast = c > 0
    starts_end = ~is_fast & (tok == end0)
    ok_f = jnp.where(is_fast, state.total + c <= target, starts_end & (state.total == target))
    phase_f = jnp.where(starts_end, END, FAST)
    count_f = jnp.where(starts_end, 1, 0)
    # END: the remaining end ids.
    ok_e = tok == _expected(spec.end_ids, state.count)
    count_e = state.count + 1

    phase = jnp.select([state.phase == PREFIX, state.phase == FAST], [phase_p, phase_f], END)
    count = jnp.select([state.phase == PREFIX, state.phase == FAST], [count_p, count_f], count_e)
    ok = jnp.select([state.phase == PREFIX, state.phase == FAST], [ok_p, ok_f], ok_e)
    total = jnp.where((state.phase == FAST) & is_fast, state.total + c, state.total)
    finished = (phase == END) & (count >= n_end)

    active = ~state.done
    keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731
    return DecodeState(
        phase=keep(phase, state.phase),
        count=keep(count, state.count),
        total=keep(total, state.total),
        done=state.done | (active & (~ok | finished)),
        valid=state.valid & (~active | ok),
    )


def completed(state: DecodeState, spec: FastDecodeSpec) -> Bool[Array, " b"]:
    """Rows that followed the grammar to its end."""
    return state.valid & state.done & (state.phase == END) & (state.count >= len(spec.end_ids))


@struct.dataclass
class FastDecodeResult:
    tokens: Int[Array, "b t"]  # emitted model ids, 0 after a row is done
    num_tokens: Int[Array, " b"]
    valid: Bool[Array, " b"]  # the row is exactly prefix + FAST (horizon × dim coefficients) + end
    logprobs: Float[Array, "b t"]  # unconstrained log-probability of each emitted token (0 after done)


def sample_token(
    rng: jax.Array, scores: Float[Array, "b v"], temperature: float
) -> Int[Array, " b"]:
    """Greedy at temperature 0, else a draw from softmax(scores / temperature)."""
    if temperature <= 0.0:
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, scores / temperature, axis=-1).astype(jnp.int32)
