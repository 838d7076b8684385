"""Deliberately broken sync backends for the tests that must catch them (replica checks)."""

import jax
from jax import lax

from jaxsync import sync
from jaxsync.sync import psum
from jaxsync.sync.base import apply_optimizer


def make_skewed(tx, axis_name, **_):
    """A broken backend: every device applies the mean gradient, device 1 a hair more of it."""

    def update(grads, opt_state, params):
        mean = lax.pmean(grads, axis_name)
        skew = 1.0 + 1e-3 * (lax.axis_index(axis_name) == 1)
        return apply_optimizer(tx, jax.tree.map(lambda g: g * skew, mean), opt_state, params)

    return sync.SyncBackend("skewed", tx.init, update)


# A registry entry for it: ``monkeypatch.setitem(sync.BACKENDS, "skewed", SKEWED)``.
SKEWED = sync.Backend(
    name="skewed", summary="broken", all_reduce=psum.all_reduce, cost=psum.cost, make=make_skewed
)
