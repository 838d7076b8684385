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
GAN = {  # GANConfig field -> help; each default is GANConfig's
    "dataset": "Real data: ring8 | grid25 | digits (needs scikit-learn).",
    "net": "Networks: mlp | conv (conv for --dataset=digits only).",
    "width": "Generator hidden width (mlp) or channels (conv); 0 picks 128 / 32.",
    "d_width": "Discriminator width or channels; 0: as --width.",
    "d_depth": "Discriminator hidden layers, mlp only (>= 1).",
    "latent_dim": "Latent z dimension; 0 picks 2 for the toys, 32 for digits.",
    "strategy": "Gradient sync for both nets: single (one device) or a sync backend: "
    f"{' | '.join(backend_names())} (jaxsync.sync.BACKENDS).",
    "batch_size": "Global batch over all devices (>= 1; divisible by devices × pac).",
    "remedy": "Mode-collapse remedy: none, or '+'-joined pac (PacGAN packing), r1 (R1 gradient "
    "penalty), unroll (unrolled discriminator), e.g. pac+r1.",
    "pac": "PacGAN packing degree m (>= 1) when --remedy has pac.",
    "r1_gamma": "R1 penalty weight γ (>= 0) when --remedy has r1.",
    "unroll_steps": "Unrolled discriminator updates K (>= 1) when --remedy has unroll.",
    "optimizer": "Optimizer for both nets (jaxsync.optim names).",
    "g_lr": "Generator peak learning rate (> 0).",
    "d_lr": "Discriminator peak learning rate (> 0).",
    "beta1": "Adam β1 for both nets, in [0, 1).",
    "schedule": "Learning-rate schedule: constant | linear | cosine (decay to 0 at --steps).",
    "plot_every": "Save a PNG every this many steps (>= 0; 0: only at the end).",
    "cluster": cli.CLUSTER_HELP + " A step is one D and one G update.",
}
cli.define_fields(GANConfig(), GAN)
# The command line saves pictures by default; the library (GANConfig.plot_dir "") does not.
flags.DEFINE_string("plot_dir", "results/gan_plots", "Folder for the PNGs; '' for none.")
cli.define_device_flags()
cli.define_run_flags(
    GANConfig().run,
    steps="Training steps, each one D update then one G update (>= 1).",
    seed="Seed for initialisation, data and latents.",
    log_every="Score samples and write a metrics line every this many steps (>= 1).",
)


def main(argv):
    cli.init_runtime()
    from jaxsync.agents.gan.train import train_gan

    own = {**cli.fields_from_flags(GAN), "plot_dir": FLAGS.plot_dir}
    run = cli.run_config_from_flags(GANConfig().run)
    summary = train_gan(GANConfig(**own, num_devices=FLAGS.num_devices, run=run))
    print("summary " + " ".join(f"{k}={v}" for k, v in summary.items() if k != "summary"))


if __name__ == "__main__":
    cli.run(main)
