"""The suite runs with run-time annotation checks (tests/conftest.py): a wrong shape is refused at the call."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from ki_data.normalize import compute_stats
from ki_model import losses

pytestmark = pytest.mark.skipif(os.environ.get("KI_SHAPE_CHECKS") == "0", reason="KI_SHAPE_CHECKS=0")


def test_a_wrong_shape_is_refused_when_checks_are_on():
    v, t = jnp.zeros((2, 5, 3)), jnp.zeros((2, 5, 3))
    assert float(losses.flow_matching_loss(v, t, None)) == 0.0  # the right shapes pass
    with pytest.raises(TypeCheckError, match="flow_matching_loss"):
        losses.flow_matching_loss(v, jnp.zeros((2, 5, 4)), None)  # d disagrees between the two arguments
    with pytest.raises(TypeCheckError, match="flow_matching_loss"):
        losses.flow_matching_loss(v, t, jnp.zeros((2, 6), bool))  # h of the pad mask disagrees
    with pytest.raises(TypeCheckError, match="compute_stats"):
        compute_stats(np.zeros(7, np.float32))  # [n, d] expected, one axis given
    with pytest.raises(TypeCheckError, match="compute_stats"):
        compute_stats(jnp.zeros((7, 2)))  # a jax array where numpy is annotated


def test_checks_can_be_turned_off_for_one_test(no_shape_checks):
    v = jnp.zeros((2, 5, 3))
    with pytest.raises(TypeError):  # the bare broadcasting error of the code, no annotation check first
        losses.flow_matching_loss(v, jnp.zeros((2, 5, 4)), None)
