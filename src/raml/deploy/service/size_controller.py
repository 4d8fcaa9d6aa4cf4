"""The query size that keeps a latency target: a pure function of the service's measured load (issue 20, item 6).

A multi-size student (``meta["image_sizes"]``, e.g. 24, 32, 48) can answer a query at a smaller size, trading a
little accuracy for a lot of compute (a forward pass costs about the pixel count, ``size**2``). The service
measures, smoothed (:func:`smooth`, an exponentially weighted moving average):

- ``queue_delay_ms``: how long a query waits for its batch to start;
- ``service_ms[size]``: how long a batch at that size takes (forward pass and search).

The predicted latency of a batch served at ``size``, while ``current`` is in use, is
``queue_delay_ms * service_ms[size] / service_ms[current] + service_ms[size]`` (:func:`predict_latency_ms`): a
query waits for the batches ahead of it, which take longer or shorter in proportion to the size served, so the
queue delay measured at the size in use is scaled to the other size. Without that scaling a step down shortens
the queue, which invites a step straight back up (flapping; see the tests). A size never measured is estimated
from the nearest measured one, scaled by the pixel count.

The queue delay says how long queries wait *now*; it cannot say that the offered load exceeds what a size can
serve at all while the queue is momentarily short (just after a step down has drained it), and a step back up
then overloads the larger size until the queue has grown again (flapping under a steady overload). So the load
may also give each size's **utilisation**: the arrival rate times the size's time per query, the share of the
worker's time that serving the current arrivals at that size would take (> 1: the queue grows without bound).
Sizes without one are not constrained by it. :func:`choose_size` then, from the size in use:

- **steps down** when the size in use is predicted over the target, or its utilisation is over 1: to the
  largest smaller size predicted within the target with a utilisation of at most 1 (the smallest size if none
  is);
- **steps up** one size at a time, and only when the next larger size is predicted within ``up_fraction`` of
  the target (default 0.7) and its utilisation is at most ``up_fraction``: between the two thresholds it stays
  where it is, so a load that sits near the boundary does not make the size flap;
- returns the size a request **pinned** with ``size=`` unchanged (the request asked for it; it is checked to be
  one of the trained sizes).

The controller cannot make a size that keeps up out of an offered load that even the smallest size cannot serve,
nor unmake the queries queued at a larger size before a step down. :func:`queue_wait_bound_ms` is the service's
bound on a query's wait for its batch in that case (the batcher refuses a query, 503, whose predicted or actual
wait exceeds it): the wait that still leaves a query answered within the target, ``target - full batch -
window`` at the size in use, and never less than the bound of a server without a target (``window + full
batch``), so that a target never sheds more than a fixed size would.

No clock, no state, no I/O: the caller keeps the :class:`SizeLoad` and the size in use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "ControllerSettings",
    "SizeLoad",
    "choose_size",
    "ewma",
    "predict_latency_ms",
    "queue_wait_bound_ms",
    "smooth",
]


@dataclass(frozen=True)
class ControllerSettings:
    """What the controller aims at: ``target_ms`` (the p99 promise), the trained ``sizes``, the hysteresis."""

    target_ms: float
    sizes: tuple[int, ...]
    up_fraction: float = 0.7

    def __post_init__(self) -> None:
        if not self.target_ms > 0:
            raise ValueError(f"The latency target must be positive (ms), got {self.target_ms!r}.")
        if not self.sizes or any(s <= 0 for s in self.sizes) or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"sizes must be distinct positive sizes in increasing order, got {self.sizes!r}.")
        if not 0 < self.up_fraction < 1:
            raise ValueError(
                f"up_fraction must lie in (0, 1) so that stepping up needs headroom (hysteresis), got "
                f"{self.up_fraction!r}."
            )


@dataclass(frozen=True)
class SizeLoad:
    """The service's smoothed load: queue delay, batch service time per size measured so far (ms), and the
    utilisation each size would have at the current arrival rate (optional)."""

    queue_delay_ms: float = 0.0
    service_ms: Mapping[int, float] = field(default_factory=dict)
    utilisation: Mapping[int, float] = field(default_factory=dict)


def _service_ms(size: int, load: SizeLoad) -> float:
    """Measured service time at ``size``, else the nearest measured size's scaled by the pixel count; 0 if none."""
    if size in load.service_ms:
        return float(load.service_ms[size])
    if not load.service_ms:
        return 0.0
    nearest = min(load.service_ms, key=lambda s: (abs(s - size), s))
    return float(load.service_ms[nearest]) * (size / nearest) ** 2


def predict_latency_ms(size: int, load: SizeLoad, current: int | None = None) -> float:
    """Predicted latency of a batch served at ``size``: the queue delay (measured while ``current`` was in use,
    scaled by the ratio of the two sizes' service times; unscaled without ``current`` or before any measurement)
    plus that size's batch service time."""
    service = _service_ms(size, load)
    queue = float(load.queue_delay_ms)
    if current is not None and current != size and _service_ms(current, load) > 0:
        queue *= service / _service_ms(current, load)
    return queue + service


def choose_size(current: int, load: SizeLoad, settings: ControllerSettings, pinned: int | None = None) -> int:
    """The size to serve the next batch at (see the module docstring).

    Args:
        current: the size in use (one of ``settings.sizes``).
        load: the smoothed measurements.
        settings: target, trained sizes, hysteresis.
        pinned: the size a request asked for with ``size=``; returned as it is.

    Returns:
        One of ``settings.sizes``.
    """
    sizes: Sequence[int] = settings.sizes
    for name, value in (("pinned", pinned), ("current", current)):
        if value is not None and value not in sizes:
            raise ValueError(f"The {name} size {value} is not a trained size; expected one of {list(sizes)}.")
    if pinned is not None:
        return pinned
    target, up = settings.target_ms, settings.up_fraction

    def busy(size: int) -> float:
        return float(load.utilisation.get(size, 0.0))

    if predict_latency_ms(current, load) > target or busy(current) > 1.0:
        smaller = [
            s for s in sizes if s < current and predict_latency_ms(s, load, current) <= target and busy(s) <= 1.0
        ]
        return max(smaller) if smaller else sizes[0]
    larger = [s for s in sizes if s > current]
    if larger and predict_latency_ms(larger[0], load, current) <= up * target and busy(larger[0]) <= up:
        return larger[0]
    return current


def queue_wait_bound_ms(target_ms: float, full_batch_ms: float, window_ms: float) -> float:
    """The longest a query may wait for its batch to start under a latency target (see the module docstring):
    ``max(window + full batch, target - full batch - window)``, all in ms, ``full_batch_ms`` a full batch's
    service time at the size in use. A query that waited longer would be answered after the target (its batch
    takes up to a full batch's time, and waits up to the window for more queries); the front end's time (reading,
    decoding, the HTTP exchange) comes on top; with ``count_front_end`` the batcher takes its measured p90 off this
    bound."""
    for name, value in (("target_ms", target_ms), ("full_batch_ms", full_batch_ms), ("window_ms", window_ms)):
        if not value >= 0:
            raise ValueError(f"{name} must be zero or positive (ms), got {value!r}.")
    return max(window_ms + full_batch_ms, target_ms - full_batch_ms - window_ms)


def ewma(old: float | None, sample: float, alpha: float) -> float:
    """The service's one moving average: ``(1 - alpha) * old + alpha * sample``, the sample itself when there is
    no ``old`` yet (``alpha`` is checked by the callers, once)."""
    return float(sample) if old is None else (1 - alpha) * old + alpha * sample


def smooth(
    load: SizeLoad, *, queue_delay_ms: float | None = None, size: int | None = None, service_ms: float | None = None,
    alpha: float = 0.2,
) -> SizeLoad:  # fmt: skip
    """``load`` updated by one observation: ``new = (1 - alpha) * old + alpha * sample``. The queue delay starts at
    0 (an idle service); a size's first service time is taken as it is. Give the queue delay of a query, a batch's
    size and service time, or both."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha!r}.")
    queue = load.queue_delay_ms
    if queue_delay_ms is not None:
        queue = ewma(queue, queue_delay_ms, alpha)
    service = dict(load.service_ms)
    if (size is None) != (service_ms is None):
        raise ValueError("Give a batch's size and its service time together.")
    if size is not None and service_ms is not None:
        service[size] = ewma(service.get(size), service_ms, alpha)
    return SizeLoad(queue, service, load.utilisation)
