"""Data-parallel GAN training on the mode-collapse benchmarks (ring8, grid25) and 8x8 digits.

Default: the 8-Gaussian ring (PacGAN's setup, σ = 0.01), PacGAN2 + R1, psum over 8 emulated CPU
devices, 3,000 steps (about a minute on a 2-core laptop); expect all 8 modes, ~90 % high quality
(10,000 steps: 96.8 ± 0.4 % over 5 seeds, experiments/bench_gan.py):

  python experiments/train_gan.py --metrics_file=runs/gan_ring8.jsonl --plot_dir=runs/gan_plots

The 5x5 grid (σ = 0.05) needs wider networks, a faster 3-layer discriminator and more steps; expect
25 modes and > 90 % high quality after 20,000 steps (one device is the fastest on a CPU; on N
devices each step is the one-device step up to float rounding, tests/test_gan.py):

  python experiments/train_gan.py --dataset=grid25 --steps=20000 --width=256 --d_width=256 \
      --d_depth=3 --d_lr=4e-3 --log_every=2000 --num_devices=1 --strategy=single

The digits with a conv pair on the ring all-reduce:

  python experiments/train_gan.py --dataset=digits --net=conv --strategy=ring --steps=2000

Resumable runs: --workdir=runs/gan checkpoints both networks, their optimizer states and the keys
every --checkpoint_every steps; running the same command again continues from the latest
checkpoint, bitwise as if never stopped. Updates with NaN/Inf gradients are skipped; after
--max_nonfinite in a row the run stops, the last checkpoint intact. --check_replicas=K: every K
steps and at the end, check that every device holds the same bits of both networks (exit 1 naming
the first leaf that differs otherwise).

The summary line gives modes captured, % high-quality samples and the reverse KL (toys), or
classes covered, mean classifier confidence and the class-histogram KL (digits).
"""

from absl import flags

from jaxsync import cli
from jaxsync.agents.gan.train import GANConfig
from jaxsync.sync import backend_names

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "ring8", "Real data: ring8 | grid25 | digits (needs scikit-learn).")
flags.DEFINE_string("net", "mlp", "Networks: mlp | conv (conv for --dataset=digits only).")
flags.DEFINE_integer(
    "width", 0, "Generator hidden width (mlp) or channels (conv); 0 picks 128 / 32."
)
flags.DEFINE_integer("d_width", 0, "Discriminator width or channels; 0: as --width.")
flags.DEFINE_integer("d_depth", 2, "Discriminator hidden layers, mlp only (>= 1).")
flags.DEFINE_integer("latent_dim", 0, "Latent z dimension; 0 picks 2 for the toys, 32 for digits.")
flags.DEFINE_string(
    "strategy",
    "psum",
    f"Gradient sync for both nets: single (one device) or a sync backend: "
    f"{' | '.join(backend_names())} (jaxsync.sync.BACKENDS).",
)
flags.DEFINE_integer(
    "batch_size", 256, "Global batch over all devices (>= 1; divisible by devices × pac)."
)
flags.DEFINE_string(
    "remedy",
    "pac+r1",
    "Mode-collapse remedy: none, or '+'-joined pac (PacGAN packing), r1 (R1 gradient penalty), "
    "unroll (unrolled discriminator), e.g. pac+r1.",
)
flags.DEFINE_integer("pac", 2, "PacGAN packing degree m (>= 1) when --remedy has pac.")
flags.DEFINE_float("r1_gamma", 0.1, "R1 penalty weight γ (>= 0) when --remedy has r1.")
flags.DEFINE_integer(
    "unroll_steps", 5, "Unrolled discriminator updates K (>= 1) when --remedy has unroll."
)
flags.DEFINE_string("optimizer", "adam", "Optimizer for both nets (jaxsync.optim names).")
flags.DEFINE_float("g_lr", 1e-3, "Generator peak learning rate (> 0).")
flags.DEFINE_float("d_lr", 1e-3, "Discriminator peak learning rate (> 0).")
flags.DEFINE_float("beta1", 0.5, "Adam β1 for both nets, in [0, 1).")
flags.DEFINE_string(
    "schedule",
    "linear",
    "Learning-rate schedule: constant | linear | cosine (decay to 0 at --steps).",
)
flags.DEFINE_integer(
    "plot_every", 0, "Save a PNG every this many steps (>= 0; 0: only at the end)."
)
flags.DEFINE_string("plot_dir", "results/gan_plots", "Folder for the PNGs; '' for none.")
cli.define_device_flags()
cli.define_run_flags(
    GANConfig().run,
    steps="Training steps, each one D update then one G update (>= 1).",
    seed="Seed for initialisation, data and latents.",
    log_every="Score samples and write a metrics line every this many steps (>= 1).",
)
OWN = ("dataset", "net", "width", "d_width", "d_depth", "latent_dim", "strategy", "num_devices")
OWN += ("batch_size", "remedy", "pac", "r1_gamma", "unroll_steps", "optimizer", "g_lr", "d_lr")
OWN += ("beta1", "schedule", "plot_every", "plot_dir")


def main(argv):
    cli.init_runtime()
    from jaxsync.agents.gan.train import train_gan

    own = {name: FLAGS[name].value for name in OWN}
    summary = train_gan(GANConfig(**own, run=cli.run_config_from_flags(GANConfig().run)))
    print("summary " + " ".join(f"{k}={v}" for k, v in summary.items() if k != "summary"))


if __name__ == "__main__":
    cli.run(main)
