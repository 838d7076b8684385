"""A described cluster: workers, a one- or two-level topology, α–β links, compute, stragglers.

On emulated CPU devices every message is a memory copy, so measured wall-clock says nothing about
a real cluster (issue #17). A :class:`Cluster` describes one instead; :mod:`.cost` turns it into
seconds per step of every synchronisation pattern and :mod:`.events` into the arrival order of
asynchronous gradients.

Links follow the α–β (latency–bandwidth) model of Hockney (1994), "The communication challenge
for MPP: Intel Paragon and Meiko CS-2", Parallel Computing 20: a message of S bytes on a link
takes α + S/β seconds.

Topology: ``workers`` devices in ``workers / devices_per_node`` nodes. ``devices_per_node`` 1 (every
device its own host) or ``workers`` (one box) is *flat*: one link type joins every pair (the
inter-node link, resp. the intra-node one). Otherwise it is two-level: devices of a node talk
over the intra-node link, devices of different nodes over the inter-node link.
``inter_bandwidth`` is one flow's bandwidth across nodes (one device to one device);
``node_bandwidth`` (0: ``inter_bandwidth × devices_per_node``, a NIC per device as in rail-
optimised GPU clusters) caps what all of a node's devices together send across at once, so f
concurrent flows leaving a node get min(inter_bandwidth, node_bandwidth / f) each.

Compute time per step of a worker (seconds), the first that is set:
1. ``step_time_s``, given directly;
2. ``measured_step_s × throughput_scale``: a step time measured on some device, scaled to the
   simulated one (``throughput_scale`` = measured device's throughput / simulated device's, e.g.
   0.25 for a device 4× faster);
3. ``flops_per_step / (peak_flops × utilisation)`` (the presets' default; utilisation is the
   model-FLOPs utilisation, MFU, of Chowdhery et al. 2022, PaLM, §4: 46 % at 540B).

Heterogeneity (drawn per gradient, seeded, in :mod:`.events`): the time of gradient k of worker i
is ``compute · slow_i · exp(σ·z − σ²/2) + stall``: the log-normal jitter has mean 1, the first
⌈straggler_fraction · N⌉ workers are ``straggler_slowdown`` × slower (the same ids as the async
emulator's ``stragglers`` model), and with probability ``stall_prob`` a gradient waits
``stall_s`` seconds more (a transient stall: GC, a preempted host, a noisy neighbour).

``model_bytes`` is the workload's message: what an asynchronous worker pushes (a gradient) and
pulls (the parameters). The cost functions of :mod:`.cost` take the message size as an argument;
the asynchronous schedule reads it here, since the emulator's config only names a cluster.
"""

from __future__ import annotations

import dataclasses
import math

from jaxsync import ConfigError

# The presets' default workload: a 25M-parameter model in float32 (100 MB of gradient) at
# C ≈ 6·P·D FLOPs per step (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", §2.1:
# forward + backward ≈ 6 FLOPs per parameter per token), D = 8192 tokens per device and step.
DEFAULT_PARAMS = 25_000_000
DEFAULT_TOKENS = 8192


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A cluster (see the module docstring for every field's model). Seconds, bytes, bytes/s."""

    name: str = "custom"
    workers: int = 8
    devices_per_node: int = 1
    intra_latency: float = 2e-6
    intra_bandwidth: float = 150e9
    inter_latency: float = 5e-6
    inter_bandwidth: float = 25e9
    node_bandwidth: float = 0.0
    step_time_s: float = 0.0
    measured_step_s: float = 0.0
    throughput_scale: float = 1.0
    flops_per_step: float = 6.0 * DEFAULT_PARAMS * DEFAULT_TOKENS
    peak_flops: float = 312e12
    utilisation: float = 0.4
    jitter_sigma: float = 0.0
    straggler_fraction: float = 0.0
    straggler_slowdown: float = 1.0
    stall_prob: float = 0.0
    stall_s: float = 0.0
    model_bytes: float = 4.0 * DEFAULT_PARAMS

    @property
    def nodes(self) -> int:
        return self.workers // self.devices_per_node

    @property
    def flat(self) -> bool:
        """One link type between every pair of devices."""
        return self.devices_per_node in (1, self.workers)

    def link(self, inter: bool, flows: int = 1) -> tuple[float, float]:
        """``(α, β)`` of one flow on the intra- or inter-node link, ``flows`` of a node's devices
        sending across at once (inter-node only)."""
        if not inter:
            return self.intra_latency, self.intra_bandwidth
        node = self.node_bandwidth or self.inter_bandwidth * self.devices_per_node
        return self.inter_latency, min(self.inter_bandwidth, node / max(flows, 1))

    def flat_link(self) -> tuple[float, float]:
        """``(α, β)`` of a flat topology's one link (ConfigError on a two-level one)."""
        if not self.flat:
            raise ConfigError(f"cluster {self.name!r} is two-level; this pattern needs a flat one")
        return self.link(inter=self.devices_per_node == 1)

    def slowest_link(self) -> tuple[float, float]:
        """``(α, β)`` of the slowest hop a pattern that ignores the topology crosses."""
        return self.flat_link() if self.flat else self.link(inter=True)

    def same_node(self, i: int, j: int) -> bool:
        return i // self.devices_per_node == j // self.devices_per_node

    def compute_s(self) -> float:
        """A normal worker's compute time per step, before heterogeneity (seconds)."""
        if self.step_time_s > 0:
            return self.step_time_s
        if self.measured_step_s > 0:
            return self.measured_step_s * self.throughput_scale
        return self.flops_per_step / (self.peak_flops * self.utilisation)

    def straggler_ids(self) -> range:
        """The slow workers: the first ⌈fraction · N⌉ ids (as the async emulator's)."""
        return range(math.ceil(self.straggler_fraction * self.workers - 1e-9))


# Sources of the presets' numbers (each an assumption, stated so it can be overridden):
# - NVLink-class intra-node: α 2 µs, 150 GB/s per direction per GPU (NVLink 3 on A100 is 300 GB/s
#   per direction in all, nccl-tests bus bandwidth ≈ 230 GB/s on a DGX A100; 150 GB/s leaves
#   room for protocol overheads and older NVLink).
# - 200 Gb/s HDR InfiniBand: 25 GB/s per flow, α ≈ 5 µs end to end through one switch (Mellanox
#   quotes ~0.6 µs port-to-port; the rest is the NIC, PCIe and the software stack). One HCA per
#   GPU, as in the DGX A100's 8 × 200 Gb/s compute fabric, so a node sends 200 GB/s in all.
# - 25 GbE: 25 Gb/s = 3.125 GB/s, α ≈ 30 µs (kernel TCP stack, one top-of-rack switch).
# - WAN: 1 Gb/s = 125 MB/s shared by a data centre's devices, α = 50 ms one way (a cross-
#   continent round trip of ~100 ms).
# - Compute: an A100's dense bf16 peak of 312 TFLOP/s at 40 % utilisation.
PRESETS: dict[str, Cluster] = {
    "datacenter": Cluster(
        name="datacenter",
        workers=64,
        devices_per_node=8,
        intra_latency=2e-6,
        intra_bandwidth=150e9,
        inter_latency=5e-6,
        inter_bandwidth=25e9,
    ),
    "ethernet": Cluster(
        name="ethernet",
        workers=64,
        devices_per_node=1,
        inter_latency=30e-6,
        inter_bandwidth=25e9 / 8,
        straggler_fraction=0.05,
        straggler_slowdown=2.0,
    ),
    "wan": Cluster(
        name="wan",
        workers=32,
        devices_per_node=8,
        intra_latency=2e-6,
        intra_bandwidth=150e9,
        inter_latency=50e-3,
        inter_bandwidth=1e9 / 8,
        node_bandwidth=1e9 / 8,
    ),
}

_INT_FIELDS = ("workers", "devices_per_node")
_FIELDS = tuple(f.name for f in dataclasses.fields(Cluster) if f.name != "name")


def validate(c: Cluster) -> Cluster:
    """``c``, or one ConfigError line naming the first bad field."""
    for name in _INT_FIELDS:
        if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
            raise ConfigError(f"--cluster {name} must be an integer >= 1, got {getattr(c, name)}")
    if c.workers % c.devices_per_node:
        raise ConfigError(
            f"--cluster devices_per_node={c.devices_per_node} must divide workers={c.workers}"
        )
    checks = {
        "> 0": ("intra_bandwidth", "inter_bandwidth", "throughput_scale", "peak_flops"),
        ">= 0": ("intra_latency", "inter_latency", "node_bandwidth", "step_time_s")
        + ("measured_step_s", "flops_per_step", "jitter_sigma", "stall_s", "model_bytes"),
        ">= 1": ("straggler_slowdown",),
        "in [0, 1]": ("straggler_fraction", "stall_prob"),
        "in (0, 1]": ("utilisation",),
    }
    tests = {
        "> 0": lambda v: v > 0,
        ">= 0": lambda v: v >= 0,
        ">= 1": lambda v: v >= 1,
        "in [0, 1]": lambda v: 0 <= v <= 1,
        "in (0, 1]": lambda v: 0 < v <= 1,
    }
    for rule, names in checks.items():
        for name in names:
            v = getattr(c, name)
            if not (math.isfinite(v) and tests[rule](v)):
                raise ConfigError(f"--cluster {name} must be {rule}, got {v}")
    if c.step_time_s > 0 and c.measured_step_s > 0:
        raise ConfigError("--cluster: give step_time_s or measured_step_s, not both")
    if not c.compute_s() > 0:
        raise ConfigError(
            "--cluster needs a compute time: step_time_s, measured_step_s or flops_per_step > 0"
        )
    return c


def _number(name: str, text: str):
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--cluster {name}={text!r} is not a number") from None
    if name in _INT_FIELDS:
        if value != int(value):
            raise ConfigError(f"--cluster {name} must be an integer >= 1, got {text}")
        return int(value)
    return value


def parse_cluster(text: str) -> Cluster:
    """A ``--cluster`` flag value: a preset name, optionally ``:field=value,field=value``.

    E.g. ``wan``, ``ethernet:workers=16,jitter_sigma=0.3``, ``datacenter:step_time_s=0.05``.
    Bad input is one ConfigError line.
    """
    name, _, rest = text.strip().partition(":")
    if name not in PRESETS:
        raise ConfigError(f"unknown --cluster preset {name!r}; choose from {list(PRESETS)}")
    overrides = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ConfigError(f"--cluster override {item!r} is not field=value")
        if key not in _FIELDS:
            raise ConfigError(f"unknown --cluster field {key!r}; choose from {list(_FIELDS)}")
        overrides[key] = _number(key, value.strip())
    return validate(dataclasses.replace(PRESETS[name], **overrides))
