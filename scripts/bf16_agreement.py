"""Loss agreement of mixed precision (bfloat16 activations, float32 weights) with float32, same weights and draws.

    python scripts/bf16_agreement.py [tiny|small]
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ki_bench.synthetic import perturb_params, synthetic_batch, synthetic_tokenizers
from ki_model import Pi05KIConfig

preset = sys.argv[1] if len(sys.argv) > 1 else "tiny"
toks = synthetic_tokenizers(10, 7)
cfg = Pi05KIConfig.preset(preset, action_horizon=10, action_dim=7, vocab_size=toks.vocab_size, dtype="float32")
batch = synthetic_batch(cfg, toks, 4, seed=0)
model = cfg.create(nnx.Rngs(0))
perturb_params(model, 1)
params = nnx.state(model, nnx.Param)
noise = jax.random.normal(jax.random.key(1), batch.actions.shape)
time = jnp.linspace(0.1, 0.9, 4)
out = {}
for dtype in ("float32", "bfloat16"):
    graphdef = nnx.split(dataclasses.replace(cfg, dtype=dtype).create(nnx.Rngs(0)), nnx.Param)[0]
    run = jax.jit(lambda p, g=graphdef: nnx.merge(g, p).losses_given_noise(batch.obs, batch.actions, noise, time,
                                                                            batch.action_is_pad))
    out[dtype] = {k: float(v) for k, v in run(params).items()}
for k in ("flow", "fast"):
    a, b = out["float32"][k], out["bfloat16"][k]
    print(f"{preset} {k}: float32 {a:.6f} bfloat16 {b:.6f} relative difference {abs(a - b) / abs(a):.2e}")
