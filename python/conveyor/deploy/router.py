"""Per request: which version answers under a rollout, and whether a shadow copy is made.

    table = RouteTable.canary(champion=1, challenger=2, challenger_percent=10, salt="m-canary")
    router = Router(table)                       # seed=... for repeatable tests
    decision = router.route(key)                 # key: str | bytes | None
    decision.version                             # the version that answers
    decision.shadow_version                      # a version to copy the request to, or None

Rules the callers rely on:

- A request that names a version (`/v2/models/{m}/versions/{v}/infer`, gRPC
  `model_version`, `Runtime.model(name, version)`) never reaches the router: the caller
  serves that version as asked. With no rollout active the caller holds no router and
  routes nothing.
- Sticky: a non-empty key is hashed (64-bit FNV-1a over its UTF-8 bytes, salted, then
  the splitmix64 finalizer: stable across processes, restarts and machines) to a point in
  [0, 2^63), and the arms own consecutive ranges of that interval in table order. The same
  key therefore gets the same version for a given table. A canary table puts the
  challenger first, so a key is on the challenger exactly when its point lies below the
  challenger's weight: raising the weight only moves keys from champion to challenger.
- Without a key (or with `sticky` off) the point comes from a splitmix64 generator owned
  by the router (seeded from the OS unless `seed` is given); each call advances it.
- Shadow: the decision's point, mixed once more, is compared with the shadow share, so a
  keyed request is either always or never copied, and the copy is independent of the arm.
- `RouteDecision` objects are shared and immutable: one per (arm, shadow) pair.

The decision runs in C++ (`conveyor/router.h`) when the compiled module has it, else in
the Python reference below; both give identical decisions for the same table, key and
seed. A router is replaced, not changed, when the weights change (`Router(new_table)`);
assigning the new one is atomic for readers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

from conveyor import _core
from conveyor.rollout_config import RolloutConfig, RolloutVersions
from conveyor.errors import ConfigError

MASK64 = (1 << 64) - 1
POINT_LIMIT = 1 << 63  # points lie in [0, POINT_LIMIT); a bound of POINT_LIMIT means 100%
FNV_OFFSET_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
SPLITMIX_INCREMENT = 0x9E3779B97F4A7C15
SHADOW_STREAM = 0x5BD1E9955BD1E995  # decorrelates the shadow draw from the arm draw

_NativeRouter = getattr(_core, "Router", None)


def mix64(value: int) -> int:
    """The splitmix64 finalizer: a bijection of 64-bit values that spreads every input bit."""
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def fnv1a64(data: bytes, basis: int = FNV_OFFSET_BASIS) -> int:
    """64-bit FNV-1a of `data`, starting from `basis`."""
    value = basis
    for byte in data:
        value = ((value ^ byte) * FNV_PRIME) & MASK64
    return value


def salt_basis(salt: str) -> int:
    """The FNV basis a salt gives: each salt splits the keys its own way."""
    return fnv1a64(salt.encode())


def route_key_hash(key: str | bytes, salt: str = "") -> int:
    """The 64-bit hash of a routing key under `salt`; the same in every process and in C++."""
    data = key.encode() if isinstance(key, str) else key
    return mix64(fnv1a64(data, salt_basis(salt)))


def _percent_bound(percent: Fraction) -> int:
    """The point bound of a cumulative percentage (floor; exact for 0 and 100)."""
    return min(POINT_LIMIT, math.floor(percent * POINT_LIMIT / 100))


class RouteDecision(NamedTuple):
    """What the router decided for one request."""

    version: int  # the version that answers
    shadow_version: int | None  # the version the request is copied to, or None


@dataclass(frozen=True)
class RouteTable:
    """One rollout state: arms (version, percent) in range order, the shadow share, the salt.

    Percentages of the arms add up to 100; an arm at 0 gets nothing.
    """

    arms: tuple[tuple[int, float], ...]
    shadow_version: int | None = None
    shadow_percent: float = 0.0
    salt: str = ""
    sticky: bool = True

    def __post_init__(self) -> None:
        if not self.arms:
            raise ConfigError("route table: expected at least one arm (version, percent), got none")
        versions = [version for version, _ in self.arms]
        if len(set(versions)) != len(versions):
            raise ConfigError(f"route table: expected each version in one arm, got versions {versions}")
        if any(not 0 <= percent <= 100 for _, percent in self.arms):
            raise ConfigError(f"route table: expected arm percentages in [0, 100], got {[p for _, p in self.arms]}")
        total = math.fsum(percent for _, percent in self.arms)
        if abs(total - 100) > 1e-6:
            raise ConfigError(f"route table: expected arm percentages adding up to 100, got {total:g}")
        if not 0 <= self.shadow_percent <= 100:
            raise ConfigError(f"route table: expected shadow_percent in [0, 100], got {self.shadow_percent:g}")
        if self.shadow_percent > 0 and self.shadow_version is None:
            raise ConfigError("route table: a shadow_percent above 0 needs a shadow_version to copy to")

    @classmethod
    def canary(cls, champion: int, challenger: int, challenger_percent: float, *, salt: str = "", sticky: bool = True) -> RouteTable:
        """Challenger first: raising its percent only moves keys from the champion to it."""
        return cls(((challenger, challenger_percent), (champion, 100.0 - challenger_percent)), salt=salt, sticky=sticky)

    @classmethod
    def weighted(cls, arms: Sequence[tuple[int, float]], *, salt: str = "", sticky: bool = True) -> RouteTable:
        """A/B/n: fixed percentages over the arms, in the given order."""
        return cls(tuple((int(version), float(percent)) for version, percent in arms), salt=salt, sticky=sticky)

    @classmethod
    def shadow(cls, champion: int, challenger: int, percent: float, *, salt: str = "", sticky: bool = True) -> RouteTable:
        """The champion answers everything; `percent` of requests are copied to the challenger."""
        return cls(((champion, 100.0),), shadow_version=challenger, shadow_percent=percent, salt=salt, sticky=sticky)

    @classmethod
    def initial(cls, rollout: RolloutConfig, versions: RolloutVersions, model: str) -> RouteTable:
        """The state a rollout starts in: canary at its first step, A/B/n at its weights,
        shadow and blue-green with the champion answering (blue-green's challenger is a
        preview: reachable by version, and copied to at `shadow_percent`)."""
        salt, sticky = rollout.sticky_salt(model), rollout.sticky.enabled
        champion = versions.champion
        if rollout.strategy == "ab":
            return cls.weighted([(arm.version, arm.weight) for arm in rollout.arms], salt=salt, sticky=sticky)
        (challenger,) = versions.challengers
        if rollout.strategy == "canary":
            return cls.canary(champion, challenger, rollout.steps[0].weight, salt=salt, sticky=sticky)
        return cls.shadow(champion, challenger, rollout.shadow_percent or 0.0, salt=salt, sticky=sticky)

    def decides_by_key(self) -> bool:
        """Whether a routing key can change a decision: False when sticky is off, or when one
        arm takes every request and every request is copied or none is (a shadow at 0 or
        100%), so a caller may skip reading the key."""
        if not self.sticky:
            return False
        single_arm = sum(1 for _, percent in self.arms if percent > 0) == 1
        all_or_none_copied = self.shadow_version is None or self.shadow_percent in (0.0, 100.0)
        return not (single_arm and all_or_none_copied)

    def arm_bounds(self) -> list[int]:
        """Cumulative upper point bounds, one per arm; the last is POINT_LIMIT."""
        bounds, cumulative = [], Fraction(0)
        for _, percent in self.arms:
            cumulative += Fraction(percent)
            bounds.append(_percent_bound(cumulative))
        bounds[-1] = POINT_LIMIT
        return bounds

    def shadow_bound(self) -> int:
        """Points below this are copied to the shadow version."""
        return _percent_bound(Fraction(self.shadow_percent)) if self.shadow_version is not None else 0


class _PythonDecider:
    """The reference decision: returns arm_index * 2 + shadow, as the C++ one does."""

    def __init__(self, bounds: list[int], shadow_bound: int, basis: int, sticky: bool, seed: int) -> None:
        self.bounds, self.shadow_bound, self.basis, self.sticky = bounds, shadow_bound, basis, sticky
        self.state = seed & MASK64

    def decide(self, key: str | bytes | None = None) -> int:
        if key and self.sticky:
            draw = mix64(fnv1a64(key.encode() if isinstance(key, str) else key, self.basis))
        else:
            self.state = (self.state + SPLITMIX_INCREMENT) & MASK64
            draw = mix64(self.state)
        point = draw >> 1
        arm = 0
        while point >= self.bounds[arm]:
            arm += 1
        shadow = self.shadow_bound != 0 and (mix64(draw ^ SHADOW_STREAM) >> 1) < self.shadow_bound
        return arm * 2 + shadow


class Router:
    """Routes requests under one RouteTable; `route(key)` is the per-request call.

    `implementation`: "native" (C++, the default when compiled in), or "python" (the
    reference). Safe to call from several threads: the native generator advances
    atomically; the Python one relies on the GIL.
    """

    def __init__(self, table: RouteTable, *, seed: int | None = None, implementation: str | None = None) -> None:
        if implementation is None:
            implementation = "native" if _NativeRouter is not None else "python"
        if implementation == "native" and _NativeRouter is None:
            raise ConfigError("router: the compiled module has no native router; rebuild it or use implementation='python'")
        if implementation not in ("native", "python"):
            raise ConfigError(f"router: expected implementation 'native' or 'python', got {implementation!r}")
        self.table = table
        self.implementation = implementation
        self.keyed = table.decides_by_key()  # False: route(key) gives the same for every key
        seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed & MASK64
        args = (table.arm_bounds(), table.shadow_bound(), salt_basis(table.salt), table.sticky, seed)
        decider = _NativeRouter(*args) if implementation == "native" else _PythonDecider(*args)
        self._decide = decider.decide
        shadow = table.shadow_version
        self._decisions = [RouteDecision(version, shadow if copy else None) for version, _ in table.arms for copy in (False, True)]

    def route(self, key: str | bytes | None = None) -> RouteDecision:
        """The decision for one request; `key` is its routing key (None or empty: none)."""
        return self._decisions[self._decide(key)]
