"""GAN agents: metrics on hand-made samples, losses on known logits, data-parallel parity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsync import ConfigError
from jaxsync.agents.gan import data, gan, metrics, nets
from jaxsync.replicas import ReplicaDivergence

RING = data.ring_means(8, 1.0)
GRID = data.grid_means(5, 2.0)


# ---- mode metrics on hand-made sample sets ---------------------------------------------------


def test_all_samples_on_the_ring_modes():
    samples = np.tile(RING, (2500 // 8 + 1, 1))[:2500]
    m = metrics.mode_metrics(samples, RING, 0.01)
    assert m["modes"] == 8 and m["hq_percent"] == 100.0
    assert m["reverse_kl"] == pytest.approx(0.0, abs=2e-3)  # 2500 is not a multiple of 8


def test_all_samples_at_one_mode():
    samples = np.repeat(RING[3:4], 2500, 0) + 0.005  # inside 3σ of mode 3
    m = metrics.mode_metrics(samples, RING, 0.01)
    assert m["modes"] == 1 and m["hq_percent"] == 100.0
    assert m["reverse_kl"] == pytest.approx(math.log(8))
    assert m["counts"][3] == 2500


def test_high_quality_threshold_is_three_sigma():
    # Half the samples at 2.9σ from a grid mode, half at 3.1σ: 50 % high quality, one mode.
    near = GRID[0] + np.array([2.9 * 0.05, 0.0])
    far = GRID[0] + np.array([0.0, 3.1 * 0.05])
    m = metrics.mode_metrics(np.stack([near, far] * 50), GRID, 0.05)
    assert m["modes"] == 1 and m["hq_percent"] == pytest.approx(50.0)


def test_no_high_quality_sample_gives_infinite_kl():
    m = metrics.mode_metrics(np.full((10, 2), 0.5), RING, 0.01)
    assert m["modes"] == 0 and m["hq_percent"] == 0.0 and math.isinf(m["reverse_kl"])


def test_grid_two_modes_uneven():
    samples = np.concatenate([np.repeat(GRID[:1], 300, 0), np.repeat(GRID[24:], 100, 0)])
    p = np.array([0.75, 0.25])
    m = metrics.mode_metrics(samples, GRID, 0.05)
    assert m["modes"] == 2
    assert m["reverse_kl"] == pytest.approx(float(np.sum(p * np.log(25 * p))))


def test_digit_scores_from_probabilities():
    probs = np.eye(10)[[0, 0, 1, 2]] * 0.8 + 0.02
    s = metrics.digit_scores(probs)
    p = np.array([0.5, 0.25, 0.25])
    assert s["classes"] == 3 and s["confidence"] == pytest.approx(0.82)
    assert s["class_kl"] == pytest.approx(float(np.sum(p * np.log(10 * p))))


def test_mixture_samples_are_high_quality():
    real = data.load_real_data("grid25")
    m = metrics.mode_metrics(np.asarray(real.sample(jax.random.key(0), 2500)), GRID, 0.05)
    assert m["modes"] == 25 and m["hq_percent"] > 98.0  # 3σ in 2-D holds 98.9 % of the mass


# ---- losses on known logits ------------------------------------------------------------------


def test_losses_on_known_logits():
    zero = jnp.zeros(4)
    assert float(gan.discriminator_loss(zero, zero)) == pytest.approx(2 * math.log(2))
    assert float(gan.generator_loss(zero)) == pytest.approx(math.log(2))
    real, fake = jnp.array([2.0, -1.0]), jnp.array([0.5, -3.0])
    sig = lambda t: 1 / (1 + np.exp(-np.asarray(t)))
    want_d = -np.mean(np.log(sig(real))) - np.mean(np.log(1 - sig(fake)))
    assert float(gan.discriminator_loss(real, fake)) == pytest.approx(want_d, rel=1e-6)
    assert float(gan.generator_loss(fake)) == pytest.approx(-np.mean(np.log(sig(fake))), rel=1e-6)
    # Confident and right: both terms vanish; the non-saturating G loss stays large when D wins.
    assert float(gan.discriminator_loss(jnp.full(2, 30.0), jnp.full(2, -30.0))) < 1e-12
    assert float(gan.generator_loss(jnp.full(2, -30.0))) == pytest.approx(30.0)


def test_r1_penalty_of_a_linear_discriminator():
    w = jnp.array([3.0, -4.0])
    x = jax.random.normal(jax.random.key(0), (5, 2))
    assert float(gan.r1_penalty(lambda v: v @ w, x)) == pytest.approx(25.0)


def test_pack_groups_consecutive_samples():
    x = jnp.arange(12.0).reshape(6, 2)
    np.testing.assert_array_equal(gan.pack(x, 3), [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    images = jnp.arange(4 * 64.0).reshape(4, 8, 8)
    packed = gan.pack(images, 2)
    assert packed.shape == (2, 8, 8, 2)
    np.testing.assert_array_equal(packed[1, ..., 0], images[2])


def test_conv_pair_shapes_with_packed_images():
    gen, disc = nets.make_nets("conv", (8, 8), 8)
    z = jnp.ones((4, 3))
    g_params = gen.init(jax.random.key(0), z)["params"]
    images = gen.apply({"params": g_params}, z)
    assert images.shape == (4, 8, 8) and float(images.min()) >= 0 and float(images.max()) <= 1
    packed = gan.pack(images, 2)
    d_params = disc.init(jax.random.key(1), packed)["params"]
    assert disc.apply({"params": d_params}, packed).shape == (2,)
    with pytest.raises(ConfigError, match="8x8"):
        nets.make_nets("conv", (2,), 8)


# ---- data-parallel step == one device with the same global batch ------------------------------


def _parts(pac=2, r1=0.1, batch=32, unroll=0, d_tx=None):
    real = data.load_real_data("ring8")
    gen, disc = nets.make_nets("mlp", real.shape, 16, g_depth=2, d_depth=2)
    return gan.GANParts(
        gen,
        disc,
        real,
        optax.adam(1e-2, b1=0.5),
        d_tx or optax.sgd(0.05, momentum=0.9),
        batch,
        2,
        pac=pac,
        r1_gamma=r1,
        unroll=unroll,
    )


@pytest.fixture(scope="module")
def single_after_3_steps():
    parts = _parts()
    trainer = gan.make_gan_trainer(parts, "single")
    state, m = trainer.run(trainer.init(jax.random.key(1)), jax.random.key(2), 3)
    return jax.device_get(state), m


@pytest.mark.parametrize("strategy", ["psum", "ring", "ps"])
def test_data_parallel_matches_single_device(strategy, single_after_3_steps):
    ref, ref_metrics = single_after_3_steps
    trainer = gan.make_gan_trainer(_parts(), strategy, num_devices=4)
    state, m = trainer.run(trainer.init(jax.random.key(1)), jax.random.key(2), 3)
    assert int(state.step) == 3
    for got, want in ((state.g_params, ref.g_params), (state.d_params, ref.d_params)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
    for k in ("d_loss", "g_loss", "r1"):
        assert float(m[k]) == pytest.approx(float(ref_metrics[k]), rel=1e-4, abs=1e-6)
    _check_replicas_then_diverge_one(trainer, state, strategy)  # shares this run's compilation


def _replicated_leaves(state, strategy):
    """Leaves the replica check must cover: step, both networks, and the optimizer states unless
    the backend keeps them per device (ps)."""
    kept = (state.step, state.g_params, state.d_params)
    return len(jax.tree.leaves(kept + (() if strategy == "ps" else (state.g_opt, state.d_opt))))


def _diverge_one_copy(tree, device=2):
    """``tree`` with the first leaf's copy on mesh device ``device`` moved by one unit in the last
    place of its first value, as a backend that lost a bit on one device would leave it."""
    leaves, treedef = jax.tree.flatten(tree)
    leaf = leaves[0]
    bufs = []
    for i, shard in enumerate(leaf.addressable_shards):
        host = np.array(shard.data)
        if i == device:
            flat = host.reshape(-1)
            flat[0] = np.nextafter(flat[0], np.inf) if flat.dtype.kind == "f" else flat[0] + 1
        bufs.append(jax.device_put(host, shard.device))
    leaves[0] = jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, bufs)
    return jax.tree.unflatten(treedef, leaves)


def _check_replicas_then_diverge_one(trainer, state, strategy):
    """The replica check passes on a real run's state and fails once one device's copy of the
    step or of either network (or, except under ps, of an optimizer state) moves one ulp."""
    assert trainer.check_replicas(state) == _replicated_leaves(state, strategy)
    for field in ("step", "g_params", "d_params"):
        bad = state._replace(**{field: _diverge_one_copy(getattr(state, field))})
        with pytest.raises(ReplicaDivergence, match="device 2 differs from device 0"):
            trainer.check_replicas(bad)
    bad_opt = state._replace(d_opt=_diverge_one_copy(state.d_opt))
    if strategy == "ps":  # per device by design: only the server's copy is ever updated
        trainer.check_replicas(bad_opt)
    else:
        with pytest.raises(ReplicaDivergence, match="device 2 differs"):
            trainer.check_replicas(bad_opt)


@pytest.fixture(scope="module")
def unrolled_single_after_2_steps():
    parts = _parts(r1=0.0, unroll=2)
    trainer = gan.make_gan_trainer(parts, "single")
    return jax.device_get(trainer.run(trainer.init(jax.random.key(1)), jax.random.key(2), 2)[0])


@pytest.mark.parametrize("strategy", ["psum", "ring", "ps"])
def test_unrolled_data_parallel_matches_single_device(strategy, unrolled_single_after_2_steps):
    # G's gradient runs back through D's synchronised updates (psum / ppermute transposes).
    ref = unrolled_single_after_2_steps
    trainer = gan.make_gan_trainer(_parts(r1=0.0, unroll=2), strategy, num_devices=4)
    state, _ = trainer.run(trainer.init(jax.random.key(1)), jax.random.key(2), 2)
    for got, want in ((state.g_params, ref.g_params), (state.d_params, ref.d_params)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
    assert trainer.check_replicas(state) == _replicated_leaves(state, strategy)


def test_unrolled_discriminator_is_k_updates_and_changes_g():
    parts = _parts(unroll=2)
    state = gan.init_gan_state(parts, jax.random.key(0))
    x, z = gan.global_batch(parts, jax.random.key(1), 0)
    fake = parts.gen.apply({"params": state.g_params}, z)
    update = gan.single_updates(parts)[0]
    params, opt = state.d_params, state.d_opt
    d_grad = jax.jit(jax.grad(lambda p: gan.d_objective(parts, p, x, fake), has_aux=True))
    for _ in range(2):
        params, opt = update(d_grad(params)[0], opt, params)
    unroll = jax.jit(lambda p, o: gan.unrolled_discriminator(parts, update, p, o, x, fake))
    got = unroll(state.d_params, state.d_opt)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, params)
    # gan_step uses it: G's update differs from the plain GAN's.
    plain = parts._replace(unroll=0)
    step = lambda p: jax.jit(lambda s: gan.gan_step(p, *gan.single_updates(p), s, (x, z))[0])
    moved = [step(p)(state) for p in (parts, plain)]
    assert not all(jax.tree.leaves(jax.tree.map(np.allclose, moved[0].g_params, moved[1].g_params)))
    jax.tree.map(np.testing.assert_array_equal, moved[0].d_params, moved[1].d_params)


def test_batch_not_divisible_by_devices_times_pac():
    with pytest.raises(ConfigError, match="divisible"):
        gan.make_gan_trainer(_parts(pac=3, batch=30), "psum", num_devices=4)


# ---- a short ring8 run covers several modes ---------------------------------------------------


def test_short_ring8_run_covers_several_modes():
    real = data.load_real_data("ring8")
    gen, disc = nets.make_nets("mlp", real.shape, 64)
    tx = optax.adam(optax.linear_schedule(2e-3, 0.0, 800), b1=0.5)
    parts = gan.GANParts(gen, disc, real, tx, tx, 128, 2, pac=2, r1_gamma=0.1)
    trainer = gan.make_gan_trainer(parts, "single")
    state, _ = trainer.run(trainer.init(jax.random.key(0)), jax.random.key(1), 800)
    samples = gan.generate(parts, state.g_params, jax.random.key(2), 2500)
    m = metrics.mode_metrics(np.asarray(samples), real.means, real.sigma)
    assert m["modes"] >= 5, m
