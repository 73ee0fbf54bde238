"""What every model family adapter provides: the family's declarations (families/<name>.py) bound to one loaded
diffusers transformer, the conditioning checks, and the one model call that differs per family."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..errors import XDiTError
from ..families.spec import IMAGE, TEXT, BlockList, Family, TokenPlan

# Parameter names of a block's text stream (joint blocks) and of its adaLN modulation: both run on few rows
# (text tokens, or one vector per sample), so they barely count towards a block's compute per image token.
_FEW_ROW_MARKERS = ("context", "add_", "norm_added", "norm1.linear", "norm.linear", "scale_shift_table", "txt_",
                    "modulation", "adaLN")


def per_token_bytes(block: torch.nn.Module) -> int:
    """Parameter bytes a block applies to every image token: its compute per token, up to a constant."""
    return sum(p.numel() * p.element_size() for name, p in block.named_parameters()
               if not any(m in name for m in _FEW_ROW_MARKERS))


@dataclass
class Conditioning:
    """One branch of conditioning (positive or negative) for a whole batch."""

    cond: torch.Tensor                      # [B, L, D] text embeddings
    pooled: torch.Tensor | None = None      # [B, P] pooled text embedding (flux, sd3)
    mask: torch.Tensor | None = None        # [B, L] text attention mask
    guidance: float | None = None           # distilled guidance
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # the family's extra inputs (CondSpec.extra_inputs)

    def select(self, index: slice) -> "Conditioning":
        """The conditioning of a slice of the batch."""
        return Conditioning(self.cond[index], None if self.pooled is None else self.pooled[index],
                            None if self.mask is None else self.mask[index], self.guidance,
                            {k: v[index] for k, v in self.extra.items()})


class FamilyAdapter:
    """Adapts one diffusers transformer class to the sampling loop.

    The loop works on model-space latents [B, C, h, w] (h, w = image size / 8); the adapter turns them into the
    transformer's input layout and returns the prediction in the same [B, C, h, w] layout. A subclass (in its
    family's file) implements `predict` and `token_plan`; everything else comes from the family's declarations.
    """

    def __init__(self, spec: Family, model: torch.nn.Module, variant: str = ""):
        self.spec = spec
        self.model = model
        self.variant = variant
        self.dtype = next(model.parameters()).dtype
        # every block of the model as loaded (PipeFusion later keeps only a stage's blocks on each rank)
        self.block_count = sum(len(getattr(model, b.name)) for b in self.plan.blocks)

    # --- the family's declarations ---
    @property
    def family(self) -> str:
        return self.spec.name

    @property
    def latent(self):
        return self.spec.latent_of(self.variant)

    @property
    def latent_channels(self) -> int:
        return self.latent.channels

    @property
    def patch(self) -> int:
        return self.spec.patch

    @property
    def cond_width(self) -> int:
        return self.spec.cond.width

    @property
    def pooled_width(self) -> int | None:
        return self.spec.cond.pooled

    @property
    def uses_mask(self) -> bool:
        return self.spec.cond.mask

    @property
    def device(self) -> torch.device:
        """Where the model's weights are: every tensor of a job lives there."""
        return next(self.model.parameters()).device

    @cached_property
    def plan(self) -> TokenPlan:
        return self.token_plan()

    def token_plan(self) -> TokenPlan:
        raise NotImplementedError

    # --- latent convention (ComfyUI LATENT <-> model space) ---
    def _channel_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        fmt = self.latent
        return (torch.tensor(fmt.mean, dtype=x.dtype, device=x.device).view(shape),
                torch.tensor(fmt.std, dtype=x.dtype, device=x.device).view(shape))

    def to_model_space(self, latent: torch.Tensor) -> torch.Tensor:
        if self.latent.mean is not None:
            mean, std = self._channel_stats(latent)
            return (latent - mean) / std * self.latent.scale
        return (latent - self.latent.shift) * self.latent.scale

    def from_model_space(self, x: torch.Tensor) -> torch.Tensor:
        if self.latent.mean is not None:
            mean, std = self._channel_stats(x)
            return x / self.latent.scale * std + mean
        return x / self.latent.scale + self.latent.shift

    # --- checks ---
    @property
    def num_heads(self) -> int:
        return self.spec.heads_of(dict(self.model.config))

    def check_size(self, height: int, width: int) -> None:
        multiple = self.latent.downscale * self.patch
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise XDiTError(f"height and width must be positive multiples of {multiple} for {self.family}; "
                            f"got {height}x{width}")
        limit = self.spec.max_side_of(dict(self.model.config))
        if limit is not None and max(height, width) > limit:
            raise XDiTError(f"{height}x{width} is larger than this {self.family} model allows ({limit} px a side)")

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a request for `frames` pixel frames (an image model: 1 frame only)."""
        k = self.latent.time_downscale
        if not k:
            if frames != 1:
                raise XDiTError(f"{self.family} makes images: frames must be 1, got {frames}")
            return 1
        if frames < 1 or (frames - 1) % k:
            raise XDiTError(f"frames must be {k}k+1 (1, {k + 1}, {2 * k + 1}, ..., 81, ...) for {self.family}, "
                            f"got {frames}")
        return (frames - 1) // k + 1

    def check_request(self, req, config=None) -> None:
        """Family-specific refusals of a request (and, with `config`, of a parallel configuration); default none."""

    def check_conditioning(self, c: Conditioning, batch: int, what: str = "positive") -> None:
        def fail(msg: str) -> None:
            raise XDiTError(f"{what} conditioning for {self.family}: {msg}")

        if c.cond.ndim != 3 or c.cond.shape[-1] != self.cond_width:
            fail(f"expected cond of shape [B, L, {self.cond_width}], got {list(c.cond.shape)}")
        if c.cond.shape[0] not in (1, batch):
            fail(f"cond batch {c.cond.shape[0]} does not match batch size {batch}")
        if c.cond.shape[1] < 1:
            fail("cond has no tokens")
        if self.pooled_width is not None:
            if c.pooled is None:
                fail(f"a pooled embedding [B, {self.pooled_width}] is required")
            if c.pooled.ndim != 2 or c.pooled.shape[-1] != self.pooled_width or c.pooled.shape[0] != c.cond.shape[0]:
                fail(f"expected pooled of shape [{c.cond.shape[0]}, {self.pooled_width}], got {list(c.pooled.shape)}")
        if c.mask is not None:
            if tuple(c.mask.shape) != tuple(c.cond.shape[:2]):
                fail(f"expected mask of shape {list(c.cond.shape[:2])}, got {list(c.mask.shape)}")
            if not bool((c.mask != 0).any(dim=1).all()):
                fail("the mask hides every token of a prompt")

    def expand(self, c: Conditioning, batch: int) -> Conditioning:
        """Broadcast a batch-1 conditioning to the batch and move it to the model's device and dtype."""
        def fit(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 and batch > 1 else t
            return t.to(device=self.device, dtype=dtype if dtype is not None else t.dtype)

        return Conditioning(fit(c.cond, self.dtype), fit(c.pooled, self.dtype), fit(c.mask, None), c.guidance,
                            {k: fit(v, self.dtype) for k, v in c.extra.items()})

    def finish_latents(self, x: torch.Tensor, c: Conditioning) -> torch.Tensor:
        """Model-space latents after the last step, given the job's (positive) conditioning: what the family's
        pipeline does after its loop (default: nothing)."""
        return x

    def random_conditioning(self, batch: int, tokens: int, generator: torch.Generator) -> Conditioning:
        """Conditioning drawn from a generator (tiny models: stands in for text encoders)."""
        cond = torch.randn(batch, tokens, self.cond_width, generator=generator)
        pooled = torch.randn(batch, self.pooled_width, generator=generator) if self.pooled_width else None
        mask = torch.ones(batch, tokens, dtype=torch.long) if self.uses_mask else None
        return Conditioning(cond, pooled, mask)

    def block_list(self, block: torch.nn.Module) -> BlockList:
        """The declared block list a block of this model belongs to."""
        for bl in self.plan.blocks:
            if any(b is block for b in getattr(self.model, bl.name)):
                return bl
        raise KeyError(f"{type(block).__name__} is in none of {self.family}'s block lists")

    def block_streams(self, output, blocks: BlockList | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(main, second) stream of a block's output: image (or joint) and text for joint blocks. `blocks`: the
        block's list (default: the first list whose output form matches)."""
        if blocks is None:
            blocks = next((b for b in self.plan.blocks if (b.outputs is None) != isinstance(output, tuple)),
                          self.plan.blocks[0])
        if blocks.outputs is None:
            return output, None
        main = output[blocks.outputs.index(0)]
        second = output[blocks.outputs.index(1)] if 1 in blocks.outputs else None
        return main, second

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return cfg.num_attention_heads * cfg.attention_head_dim

    # --- the model call ---
    def predict(self, x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
        """Model output for latents x [B, C, h, w] at scheduler timestep t; same layout as x."""
        raise NotImplementedError

    def stream_lengths(self, image_tokens: int, text_tokens: int) -> dict[str, int]:
        """Each token stream's length inside the transformer for this many image tokens and text tokens (a
        family that pads its sequences says so here; PipeFusion sizes its transfers by it)."""
        return {IMAGE: image_tokens, TEXT: text_tokens}

    def image_tokens(self, height: int, width: int, frames: int = 1) -> int:
        """Image (video) tokens of a request: per latent frame (h/patch) x (w/patch)."""
        side = self.latent.downscale * self.patch
        return self.latent_frames(frames) * (height // side) * (width // side)
