"""The two training losses of π0.5-KI (docs/DESIGN.md §5): next-token cross-entropy on the FAST targets and flow matching.

The cross-entropy never holds [batch, length, vocabulary] logits: PaliGemma's vocabulary has 257152 entries, so at
π0.5 size (batch 32, 256 positions) one such float32 array is 8 GiB. The log-sum-exp runs over the vocabulary in
chunks inside a `lax.scan` whose body is rematerialised, so only one [batch, length, chunk] block exists at a time,
forward and backward, and only one chunk of the embedding table is cast to the compute dtype at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

# Vocabulary entries per chunk of the cross-entropy (a divisor of the vocabulary near this is taken when there is one).
VOCAB_CHUNK = 4096


def vocab_chunk(vocab_size: int, target: int = VOCAB_CHUNK) -> int:
    """The largest divisor of `vocab_size` in [target/2, target] (the table then reshapes into chunks without a
    padded copy), else `target` itself; the whole vocabulary when it is no larger than `target`."""
    if vocab_size <= target:
        return vocab_size
    for size in range(target, target // 2 - 1, -1):
        if vocab_size % size == 0:
            return size
    return target


def token_nll(
    hidden: Float[Array, "b n w"], table: Float[Array, "v w"], targets: Int[Array, "b n"], *, chunk: int | None = None
) -> tuple[Float[Array, "b n"], Int[Array, "b n"]]:
    """(-log p(target), argmax token) at every position, for logits = hidden @ table.T (the tied output head).

    Equal to the straightforward log_softmax over full logits up to float rounding; the logits are computed in float32
    from `hidden`'s dtype, one vocabulary chunk at a time.
    """
    vocab, width = table.shape
    chunk = chunk or vocab_chunk(vocab)
    num = -(-vocab // chunk)
    if num * chunk != vocab:  # no divisor near the target: pad (a copy of the table, for unusual vocabularies only)
        table = jnp.pad(table, ((0, num * chunk - vocab), (0, 0)))
    blocks = table.reshape(num, chunk, width)
    starts = jnp.arange(num, dtype=jnp.int32) * chunk
    b, n = targets.shape
    lowest = jnp.finfo(jnp.float32).min

    @jax.checkpoint
    def step(carry, block_and_start):
        run_max, run_sum, target_logit, best, best_id = carry
        block, start = block_and_start
        logits = jnp.einsum("bnw,vw->bnv", hidden, block.astype(hidden.dtype), preferred_element_type=jnp.float32)
        ids = start + jnp.arange(chunk, dtype=jnp.int32)
        logits = jnp.where(ids < vocab, logits, -jnp.inf)  # padded rows of an unusual vocabulary
        block_max = jnp.max(logits, axis=-1)
        new_max = jnp.maximum(run_max, block_max)
        run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.sum(jnp.exp(logits - new_max[..., None]), axis=-1)
        local = targets - start
        inside = (local >= 0) & (local < chunk)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[..., None], axis=-1)[..., 0]
        target_logit = jnp.where(inside, picked, target_logit)
        better = block_max > best
        best_id = jnp.where(better, start + jnp.argmax(logits, axis=-1).astype(jnp.int32), best_id)
        return (new_max, run_sum, target_logit, jnp.maximum(best, block_max), best_id), None

    init = (
        jnp.full((b, n), lowest, jnp.float32),
        jnp.zeros((b, n), jnp.float32),
        jnp.zeros((b, n), jnp.float32),
        jnp.full((b, n), -jnp.inf, jnp.float32),
        jnp.zeros((b, n), jnp.int32),
    )
    (run_max, run_sum, target_logit, _, best_id), _ = jax.lax.scan(step, init, (blocks, starts))
    return run_max + jnp.log(run_sum) - target_logit, best_id


def target_slots(
    hidden: Float[Array, "b n w"], targets: Int[Array, "b n"], is_target: Bool[Array, "b n"], slots: int
) -> tuple[Float[Array, "b s w"], Int[Array, "b s"], Bool[Array, "b s"]]:
    """Each row's first `slots` target positions, in order (then non-targets to fill the row): the logits need
    only these. A row with more targets than `slots` loses the rest; the caller guarantees it has none."""
    order = jnp.argsort(~is_target, axis=1, stable=True)[:, :slots]
    take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    return take(hidden), take(targets), take(is_target)


def fast_cross_entropy(
    prompt_out: Float[Array, "b l w"],
    table: Float[Array, "v w"],
    tokens: Int[Array, "b l"],
    loss_mask: Bool[Array, "b l"],
    *,
    slots: int | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(mean CE, token accuracy) over the FAST targets: the output at prompt index j-1 predicts token j where
    loss_mask[j]. `slots`: at least the most targets of any row; the logits are then computed at that many
    positions per row instead of all l - 1 (the demo's rows hold at most 17 targets in 64 positions)."""
    hidden, targets, is_target = prompt_out[:, :-1], tokens[:, 1:], loss_mask[:, 1:]
    if slots is not None and slots < targets.shape[1]:
        hidden, targets, is_target = target_slots(hidden, targets, is_target, slots)
    nll, predicted = token_nll(hidden, table, targets)
    weight = is_target.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    correct = (predicted == targets).astype(jnp.float32)
    return jnp.sum(nll * weight) / count, jnp.sum(correct * weight) / count


def flow_matching_loss(
    velocity: Float[Array, "b h d"], target: Float[Array, "b h d"], action_is_pad: Bool[Array, "b h"] | None
) -> Float[Array, ""]:
    """MSE over the real (non-pad) steps and all dims."""
    err = jnp.square(velocity - target.astype(jnp.float32))
    if action_is_pad is None:
        return jnp.mean(err)
    keep = (~action_is_pad.astype(bool)).astype(jnp.float32)[..., None]
    return jnp.sum(err * keep) / jnp.maximum(jnp.sum(keep) * err.shape[-1], 1.0)
