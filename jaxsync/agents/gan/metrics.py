"""Mode-collapse metrics: toy mixtures (VEEGAN/PacGAN) and classifier scores for digits.

Toys (Srivastava et al. 2017, "VEEGAN", §5; Lin et al. 2018, "PacGAN", §4.1), on 2,500 samples:

- a sample is *high quality* if ‖x − μ_k‖ < 3σ for its nearest mode k;
- *modes captured* = modes nearest to at least one high-quality sample;
- *% high quality* = share of high-quality samples;
- *reverse KL* = KL(p ‖ u) = Σ_k p_k log(K p_k), p the histogram of the high-quality samples over
  the K modes and u uniform (0 when every mode gets 1/K; log K when all sit at one mode).

Digits: a small classifier trained on the real digits labels each generated image; we report the
classes covered (of 10), the mean top-class confidence and KL(class histogram ‖ uniform), the
digit analogue of the toys' metrics (cf. the stacked-MNIST protocol of Metz et al. 2017).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

HQ_SIGMAS = 3.0
NUM_EVAL_SAMPLES = 2500


def kl_to_uniform(counts: np.ndarray) -> float:
    """KL(p ‖ uniform) for the histogram ``counts`` over K bins; inf when the histogram is empty."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total == 0:
        return float("inf")
    p = counts[counts > 0] / total
    return float(np.sum(p * np.log(p * len(counts))))


def mode_metrics(samples: np.ndarray, means: np.ndarray, sigma: float) -> dict:
    """Modes captured, % high quality and reverse KL of ``samples`` (n, 2) against the mixture.

    Returns:
      ``{"modes": int, "hq_percent": float, "reverse_kl": float, "counts": list[int]}``; counts
      is the number of high-quality samples per mode.
    """
    samples = np.asarray(samples, np.float64)
    dist = np.linalg.norm(samples[:, None, :] - np.asarray(means, np.float64)[None], axis=-1)
    nearest, dmin = dist.argmin(1), dist.min(1)
    hq = dmin < HQ_SIGMAS * sigma
    counts = np.bincount(nearest[hq], minlength=len(means))
    return {
        "modes": int((counts > 0).sum()),
        "hq_percent": float(100.0 * hq.mean()),
        "reverse_kl": kl_to_uniform(counts),
        "counts": counts.tolist(),
    }


def train_digit_classifier(x: np.ndarray, y: np.ndarray, seed: int = 0, steps: int = 300):
    """Fit the scoring classifier (an MLP, 64→128→10, Adam, full batch) on real digits.

    Returns:
      ``predict(images) -> probabilities (n, 10)``, a jitted function.
    """
    from jaxsync.models.mlp import MLP

    model = MLP(features=(128,), num_outputs=10)
    params = model.init(jax.random.key(seed), x[:1])["params"]
    tx = optax.adam(1e-2)
    x, y = jnp.asarray(x), jnp.asarray(y)

    def loss(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def body(carry, _):
        p, s = carry
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=steps))(
        params
    )
    return jax.jit(lambda images: jax.nn.softmax(model.apply({"params": params}, images)))


def digit_scores(probs: np.ndarray, num_classes: int = 10) -> dict:
    """Classes covered, mean confidence and KL(class histogram ‖ uniform) from class probabilities.

    Returns:
      ``{"classes": int, "confidence": float, "class_kl": float, "class_counts": list[int]}``.
    """
    probs = np.asarray(probs)
    counts = np.bincount(probs.argmax(1), minlength=num_classes)
    return {
        "classes": int((counts > 0).sum()),
        "confidence": float(probs.max(1).mean()),
        "class_kl": kl_to_uniform(counts),
        "class_counts": counts.tolist(),
    }
