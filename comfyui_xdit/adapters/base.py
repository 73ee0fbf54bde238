"""What every model family adapter provides: latent convention, conditioning checks and one model call."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import XDiTError


@dataclass
class SequencePlan:
    """Modules of a transformer whose outputs are split into per-rank token shards or gathered back.

    image/text: outputs [B, N, D] of the image and text embedders, split along N. rope: output (cos, sin) of
    a rotary embedder over [text; image] positions, split the same way. gather: output [B, N_img, D] gathered.
    attention: self-attention modules and whether their sequence holds text tokens too (joint attention).
    text_first: in joint attention the processor puts the text tokens before the image tokens.
    blocks: the transformer's block lists (attribute names) in execution order.
    """

    image: torch.nn.Module
    gather: torch.nn.Module
    attention: list[tuple[torch.nn.Module, bool]]
    text: torch.nn.Module | None = None
    rope: torch.nn.Module | None = None
    text_first: bool = True
    blocks: tuple[str, ...] = ("transformer_blocks",)


# Parameter names of a block's text stream (joint blocks) and of its adaLN modulation: both run on few rows
# (text tokens, or one vector per sample), so they barely count towards a block's compute per image token.
_FEW_ROW_MARKERS = ("context", "add_", "norm_added", "norm1.linear", "norm.linear", "scale_shift_table")


def per_token_bytes(block: torch.nn.Module) -> int:
    """Parameter bytes a block applies to every image token: its compute per token, up to a constant."""
    return sum(p.numel() * p.element_size() for name, p in block.named_parameters()
               if not any(m in name for m in _FEW_ROW_MARKERS))


@dataclass
class Conditioning:
    """One branch of conditioning (positive or negative) for a whole batch."""

    cond: torch.Tensor                      # [B, L, D] text embeddings
    pooled: torch.Tensor | None = None      # [B, P] pooled text embedding (flux, sd3)
    mask: torch.Tensor | None = None        # [B, L] text attention mask (pixart)
    guidance: float | None = None           # distilled guidance (flux dev)

    def select(self, index: slice) -> "Conditioning":
        """The conditioning of a slice of the batch."""
        return Conditioning(self.cond[index], None if self.pooled is None else self.pooled[index],
                            None if self.mask is None else self.mask[index], self.guidance)


class FamilyAdapter:
    """Adapts one diffusers transformer class to the sampling loop.

    The loop works on model-space latents [B, C, h, w] (h, w = image size / 8); the adapter turns them into the
    transformer's input layout and returns the prediction in the same [B, C, h, w] layout.
    """

    family: str
    latent_channels: int
    vae_scale: float
    vae_shift: float
    cond_width: int = 4096
    pooled_width: int | None = None
    uses_mask: bool = False
    patch: int = 2  # latent pixels per token side

    def __init__(self, model: torch.nn.Module, variant: str = ""):
        self.model = model
        self.variant = variant
        self.dtype = next(model.parameters()).dtype
        # every block of the model as loaded (PipeFusion later keeps only a stage's blocks on each rank)
        self.block_count = sum(len(getattr(model, name)) for name in self.sp_plan().blocks)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are: every tensor of a job lives there."""
        return next(self.model.parameters()).device

    # --- latent convention (ComfyUI LATENT <-> model space) ---
    def to_model_space(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.vae_shift) * self.vae_scale

    def from_model_space(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.vae_scale + self.vae_shift

    # --- checks ---
    @property
    def num_heads(self) -> int:
        return self.model.config.num_attention_heads

    def check_size(self, height: int, width: int) -> None:
        multiple = 8 * self.patch
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise XDiTError(f"height and width must be positive multiples of {multiple} for {self.family}; "
                             f"got {height}x{width}")

    def check_conditioning(self, c: Conditioning, batch: int, what: str = "positive") -> None:
        def fail(msg: str) -> None:
            raise XDiTError(f"{what} conditioning for {self.family}: {msg}")

        if c.cond.ndim != 3 or c.cond.shape[-1] != self.cond_width:
            fail(f"expected cond of shape [B, L, {self.cond_width}], got {list(c.cond.shape)}")
        if c.cond.shape[0] not in (1, batch):
            fail(f"cond batch {c.cond.shape[0]} does not match batch size {batch}")
        if self.pooled_width is not None:
            if c.pooled is None:
                fail(f"a pooled embedding [B, {self.pooled_width}] is required")
            if c.pooled.ndim != 2 or c.pooled.shape[-1] != self.pooled_width or c.pooled.shape[0] != c.cond.shape[0]:
                fail(f"expected pooled of shape [{c.cond.shape[0]}, {self.pooled_width}], got {list(c.pooled.shape)}")
        if c.mask is not None and tuple(c.mask.shape) != tuple(c.cond.shape[:2]):
            fail(f"expected mask of shape {list(c.cond.shape[:2])}, got {list(c.mask.shape)}")

    def expand(self, c: Conditioning, batch: int) -> Conditioning:
        """Broadcast a batch-1 conditioning to the batch and move it to the model's device and dtype."""
        def fit(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 and batch > 1 else t
            return t.to(device=self.device, dtype=dtype if dtype is not None else t.dtype)

        return Conditioning(fit(c.cond, self.dtype), fit(c.pooled, self.dtype), fit(c.mask, None), c.guidance)

    def random_conditioning(self, batch: int, tokens: int, generator: torch.Generator) -> Conditioning:
        """Conditioning drawn from a generator (tiny models: stands in for text encoders)."""
        cond = torch.randn(batch, tokens, self.cond_width, generator=generator)
        pooled = torch.randn(batch, self.pooled_width, generator=generator) if self.pooled_width else None
        mask = torch.ones(batch, tokens, dtype=torch.long) if self.uses_mask else None
        return Conditioning(cond, pooled, mask)

    # --- sequence parallelism: where tokens are split and gathered ---
    def sp_plan(self) -> "SequencePlan":
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return cfg.num_attention_heads * cfg.attention_head_dim

    @staticmethod
    def block_streams(output) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image, text) hidden states from a block's output (diffusers joint blocks return (text, image))."""
        if isinstance(output, tuple):
            return output[1], output[0]
        return output, None

    # --- the model call ---
    def predict(self, x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
        """Model output for latents x [B, C, h, w] at scheduler timestep t; same layout as x."""
        raise NotImplementedError

    def image_tokens(self, height: int, width: int) -> int:
        return (height // (8 * self.patch)) * (width // (8 * self.patch))
