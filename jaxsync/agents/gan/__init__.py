"""GANs trained data-parallel: toy mixtures, 8x8 digits, mode-coverage metrics and remedies.

- :mod:`~jaxsync.agents.gan.data`: the 8-Gaussian ring, the 25-Gaussian grid and the digits.
- :mod:`~jaxsync.agents.gan.metrics`: modes captured, % high quality, reverse KL; digit scores.
- :mod:`~jaxsync.agents.gan.nets`: generator / discriminator MLPs and a small conv pair.
- :mod:`~jaxsync.agents.gan.gan`: losses, PacGAN packing, the R1 penalty, the alternating step and
  its data-parallel front end (one sync backend per network).
- :mod:`~jaxsync.agents.gan.train`: ``GANConfig`` and ``train_gan`` (the experiment's one call).
"""
