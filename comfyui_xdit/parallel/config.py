"""Parallel degrees and their validation."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError

# Mesh dimensions from outermost to innermost: Ulysses innermost (neighbouring ranks, fastest links).
MESH_DIMS = ("dp", "cfg", "pipefusion", "ring", "ulysses")


@dataclass(frozen=True)
class ParallelConfig:
    dp: int = 1
    cfg: int = 1
    pipefusion: int = 1
    ring: int = 1
    ulysses: int = 1
    num_patches: int = 1
    warmup_steps: int = 1
    shard: int = 1          # FSDP2 weight sharding over the innermost `shard` ranks (parallel/shard.py)
    shard_keep: int = 0     # 1: keep each block's gathered weights after its forward (no re-gather per call)

    @property
    def work_size(self) -> int:
        """Ranks that split the work: dp x cfg x pipefusion x ring x ulysses."""
        return self.dp * self.cfg * self.pipefusion * self.ring * self.ulysses

    @property
    def replicas(self) -> int:
        """Ranks that compute the same thing: the shard degree when it is the only degree (pure weight pooling)."""
        return self.shard if self.work_size == 1 else 1

    @property
    def world_size(self) -> int:
        return self.work_size * self.replicas

    @property
    def sp(self) -> int:
        """Sequence-parallel degree (ring x ulysses)."""
        return self.ring * self.ulysses

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in MESH_DIMS)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ParallelConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown parallel settings {sorted(unknown)}")
        return cls(**{k: int(v) for k, v in d.items()})

    def validate(self, world_size: int | None = None) -> None:
        """Checks that need no model: degrees positive, cfg 1 or 2, product equal to the world size."""
        for name in MESH_DIMS + ("num_patches", "shard"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} degree must be >= 1, got {getattr(self, name)}")
        if self.cfg not in (1, 2):
            raise ConfigError(f"cfg parallel degree must be 1 or 2, got {self.cfg}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.shard > 1:
            check_shard_degree(self)
        if world_size is not None and world_size != self.world_size:
            shard = f" (shard {self.shard} alone: {self.shard} ranks)" if self.replicas > 1 else ""
            raise ConfigError(
                f"degrees multiply to {self.world_size} (dp {self.dp} x cfg {self.cfg} x pipefusion "
                f"{self.pipefusion} x ring {self.ring} x ulysses {self.ulysses}){shard} but the world size is "
                f"{world_size}")


def shard_degrees(config: ParallelConfig) -> list[int]:
    """The shard degrees `config`'s work degrees allow: products of the innermost degrees."""
    out, product = [1], 1
    for dim in reversed(MESH_DIMS):
        product *= getattr(config, dim)
        if product not in out:
            out.append(product)
    return out


def check_shard_degree(config: ParallelConfig) -> None:
    """One-line refusals of a shard degree the mesh cannot hold."""
    if config.shard > 1 and config.pipefusion > 1:
        raise ConfigError("shard cannot combine with pipefusion: its stages hold different blocks (nothing in common "
                          "to split) and each block runs once per patch; use pipefusion alone or shard x ulysses/ring")
    if config.work_size == 1:
        return
    allowed = shard_degrees(config)
    if config.shard not in allowed:
        raise ConfigError(f"shard degree {config.shard} must be 1 or a product of the innermost degrees (ulysses, "
                          f"then ring, cfg, dp): {', '.join(map(str, allowed))} here; shard adds no ranks")


def ulysses_degrees(heads: int, limit: int = 16) -> list[int]:
    """The Ulysses degrees up to `limit` that split `heads` attention heads evenly."""
    return [d for d in range(1, min(heads, limit) + 1) if heads % d == 0]


def heads_advice(heads: int) -> str:
    """What to do instead of a Ulysses degree that does not divide the heads."""
    degrees = ulysses_degrees(heads)
    listed = ", ".join(map(str, degrees[:-1])) + f" or {degrees[-1]}" if len(degrees) > 1 else str(degrees[0])
    return f"Ulysses degrees that work: {listed}; the ring degree takes any other split"
