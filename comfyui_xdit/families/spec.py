"""What a model family declares: the types of a family file's declarations. No torch, no diffusers here: the
ComfyUI nodes read these at start-up.

Token plans use diffusers' context-parallel vocabulary (`_cp_plan`): a module path ("" the transformer itself,
"*" any index of a ModuleList, or another fnmatch pattern such as "[0]" for the first block only; a pattern may
match nothing, as on a PipeFusion stage that holds none of those blocks) maps input names (or positions) and output indices to how that tensor is split
along its token dimension, and output gathers say how a module's output is put back together. Each split also
names its token stream ("image", "text"), so the engine knows the per-rank lengths of every attention's sequence
without a collective; shards are contiguous and balanced (`shard_sizes`), never padded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

IMAGE, TEXT = "image", "text"


# ------------------------------------------------------------------------------------------------ token plans
@dataclass(frozen=True)
class Split:
    """Split a tensor of token stream `stream` along `dim`; tensors of another rank than `ndim` pass (as diffusers'
    `expected_dims`). `stream` may name several streams: a joint tensor holding them one after another along `dim`
    (e.g. a unified sequence's rope frequencies), each part split as its own stream and the parts kept in order;
    their full lengths must be known from earlier split points of the same forward (under PipeFusion: from the
    family's stream_lengths)."""
    stream: str | tuple[str, ...]
    dim: int = 1
    ndim: int | None = None


@dataclass(frozen=True)
class Gather:
    """Gather a module's output along `dim`; its local tokens are the `streams`' shards in this order."""
    streams: tuple[str, ...] = (IMAGE,)
    dim: int = 1
    ndim: int | None = None


@dataclass(frozen=True)
class BlockList:
    """A ModuleList of transformer blocks. `inputs`: the token streams a block takes (input name or position ->
    the streams it holds, in order; the first one is the main stream); `outputs`: which input each element of the
    block's tuple output is (None: the block returns its main stream). `pipelined`: PipeFusion splits this list
    into stages (False: it runs on the first stage only); `cached`: the step cache spans it."""
    name: str
    inputs: tuple[tuple[str | int, tuple[str, ...]], ...] = (("hidden_states", (IMAGE,)),)
    outputs: tuple[int, ...] | None = None
    pipelined: bool = True
    cached: bool = True

    @property
    def main(self) -> str | int:
        return self.inputs[0][0]


@dataclass(frozen=True)
class TokenPlan:
    """Where tokens are split and gathered, which modules are self-attention over which streams, the blocks."""
    inputs: dict[str, dict[str | int, Split]]           # module path -> input name/position -> split
    outputs: dict[str, dict[int | None, Split]]         # module path -> output index (None: the output) -> split
    gathers: dict[str, Gather]                          # module path -> gather of its output
    attention: dict[str, tuple[str, ...]]               # self-attention module path -> streams of its sequence
    blocks: tuple[BlockList, ...]                       # in execution order


def from_cp_plan(cp_plan: dict, streams: dict[str, str], attention: dict[str, tuple[str, ...]],
                 blocks: tuple[BlockList, ...], **extra_outputs: dict[int | None, Split]) -> TokenPlan:
    """A TokenPlan from a diffusers `_cp_plan` (ContextParallelInput / ContextParallelOutput entries, read by their
    fields). `streams` names the stream of each split: "path:key" or plain "key" (an input name, or an output
    index as text) -> stream."""
    inputs: dict[str, dict] = {}
    outputs: dict[str, dict] = {}
    gathers: dict[str, Gather] = {}
    for path, entry in cp_plan.items():
        if hasattr(entry, "gather_dim"):
            gathers[path] = Gather((IMAGE,), entry.gather_dim, entry.expected_dims)
            continue
        for key, specs in entry.items():
            for spec in specs if isinstance(specs, (list, tuple)) else (specs,):
                stream = streams.get(f"{path}:{key}", streams.get(str(key)))
                if stream is None:
                    raise ValueError(f"no stream named for {path or '<root>'}:{key} of the cp plan")
                split = Split(stream, spec.split_dim, spec.expected_dims)
                (outputs if spec.split_output else inputs).setdefault(path, {})[key] = split
    for path, entry in extra_outputs.items():
        outputs.setdefault(path, {}).update(entry)
    return TokenPlan(inputs, outputs, gathers, attention, blocks)


# ------------------------------------------------------------------------------------------------ the family
@dataclass(frozen=True)
class LatentFormat:
    """ComfyUI's LATENT convention for the family: x_model = (latent - shift) * scale, per channel when `mean`/`std`
    (x = (latent - mean) / std)."""
    channels: int
    scale: float = 1.0
    shift: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dims: int = 2                   # spatial dimensions of the latent (3: video [B, C, T, H, W])
    downscale: int = 8              # image pixels per latent pixel
    frame_axis: bool = False        # ComfyUI's LATENT is [B, C, 1, H, W] (a video VAE's format, one frame); the
    #                                 engine samples [B, C, H, W] and the CLI and the nodes add or drop the axis
    time_downscale: int = 0         # video (dims 3): pixel frames per latent frame, F = time_downscale (T - 1) + 1
    #                                 frames make T latent frames; 0: an image model (one frame)


@dataclass(frozen=True)
class CondSpec:
    """The text conditioning a family takes (the CLI's --inputs and the pool's tensors: cond, pooled, cond_mask)."""
    width: int                                   # cond [B, L, width]
    pooled: int | None = None                    # pooled [B, pooled] is required when set
    mask: bool = False                           # a text mask [B, L] is used when given
    guidance: float | None = None                # distilled guidance: the default when the request gives none
    negative_length_may_differ: bool = False     # the negative branch may have another token count
    negative: bool = True                        # takes a negative prompt (true CFG); False: cfg must be 1
    tokens: int = 256                            # text tokens its encoder produces (bench, random conditioning)
    extra_inputs: tuple[str, ...] = ()           # further --inputs names the family takes, the same for both
    #                                              branches (batch first; e.g. Wan I2V's image conditioning)


@dataclass(frozen=True)
class NativeSpec:
    """The newer ComfyUI's own model of a variant (ComfyUI 0.3.64 has none): its comfy.supported_models class, whose
    sampling settings and model type KSampler uses for it, and its comfy.latent_formats class. `patch`: that ComfyUI's
    LATENT is the engine's latent with patch x patch pixels folded into the channels (channel c * patch^2 +
    patch * dy + dx) at 1/patch of its side; 1: the engine's layout. The nodes use it only where the running ComfyUI
    has both classes and the format's channels and downscale ratio are these (nodes.families.native)."""
    supported_model: str
    model_type: str
    latent_format: str
    patch: int = 1


@dataclass(frozen=True)
class ComfySpec:
    """Names of ComfyUI's objects for a variant (built lazily by the nodes): comfy.supported_models class,
    comfy.model_base.ModelType member, comfy.latent_formats class. `shift`, for a model ComfyUI has no class of:
    (image tokens, steps) -> the sampling_settings "shift" of a job (a pipeline's size- and step-dependent shift),
    replacing the supported model's."""
    supported_model: str
    model_type: str
    latent_format: str
    text_mask: bool = True    # ComfyUI's model applies the CONDITIONING's attention_mask (False: 0.3.64's ignores
    #                           it, and so do the nodes, to sample what KSampler samples, unless the running ComfyUI's
    #                           model_base class of that name turns it into a model input)
    shift: Callable[[int, int], float] | None = None
    # the block kinds of ComfyUI's patches_replace "dit" that its model honours (SkipLayerGuidance's skipped
    # blocks), each -> the BlockList of ours with the same blocks in the same order
    skip_blocks: tuple[tuple[str, str], ...] = ()
    native: NativeSpec | None = None  # the newer ComfyUI's own model of it, used where the running ComfyUI has it


@dataclass(frozen=True)
class Variant:
    name: str
    config: str                      # shipped config in comfyui_xdit/configs/ (a published base config)
    scheduler: dict                  # diffusers scheduler config, as the checkpoint ships it
    comfy: ComfySpec | None = None   # None: ComfyUI 0.3.64 has no model for it
    latent: LatentFormat | None = None  # when it differs from the family's


@dataclass(frozen=True)
class Family:
    """Everything the engine, the weights loader, the nodes, bench and the CLI know of one model family.

    The callables take and return plain data (state dicts, configs); `adapter` names the FamilyAdapter subclass
    ("module:Class"), imported when a model is built."""
    name: str
    diffusers_class: str
    variants: tuple[Variant, ...]
    latent: LatentFormat
    cond: CondSpec
    flow: bool                                   # flow matching (else epsilon / variance preserving)
    samplers: tuple[str, ...]                    # first: the default
    adapter: str
    tiny: dict[str, dict]                        # built-in tiny models: name -> constructor kwargs
    detect: Callable[[set[str]], bool]           # does this key set (prefix stripped) belong to the family?
    infer_config: Callable[[dict, dict], dict]   # (diffusers-layout state dict or shapes, hints) -> config fields
    variant_of: Callable[[dict, str], str]       # (config, pipeline class name) -> variant name
    variant_of_keys: Callable[[set[str]], str] | None = None  # a quick guess from key names alone (the nodes)
    convert: Callable[[dict, str], tuple[dict, dict]] | None = None  # original layout -> (diffusers sd, hints)
    is_original: Callable[[set[str]], bool] = lambda keys: False     # keys in the original (non-diffusers) layout
    # LoRA files in the original layout's names (kohya `lora_unet_<module>`, ComfyUI `diffusion_model.<module>`)
    # that diffusers' LoRA loader leaves as they are: (the full model's diffusers parameter shapes) -> (diffusers'
    # single-file converter, {original key: rows} that size the model for it); lora.py moves each pair's up rows as
    # that converter moves the checkpoint's rows (None: such files are not converted)
    lora_layout: Callable[[dict], tuple[Callable[[dict], dict], dict[str, int]]] | None = None
    blocks_of: Callable[[dict], int] = lambda cfg: cfg["num_layers"]  # transformer blocks of a config
    heads_of: Callable[[dict], int] = lambda cfg: cfg["num_attention_heads"]
    max_side_of: Callable[[dict], int | None] = lambda cfg: None      # largest image side in pixels, if limited
    set_timesteps: Callable[[int, int, dict], dict] | None = None     # flow: (steps, image tokens, scheduler config)
    #                                                                   -> set_timesteps kwargs (default: steps only)
    cfg_combine: Callable[[Any, Any, float], Any] | None = None       # the pipeline's CFG rule (pos, neg, scale) ->
    #                 prediction on [B, C, h, w] tensors, used with the pipeline's schedule (no explicit sigmas);
    #                 None, and always with explicit sigmas (ComfyUI's): neg + scale * (pos - neg)
    patch: int = 2                               # latent pixels per token side
    order: int = 100                             # detection order (lower first) when key patterns overlap
    other_classes: tuple[str, ...] = ()          # other diffusers class names of the same model
    accepts: Callable[[dict], bool] = lambda cfg: True  # does a folder's config.json of such a class belong here?
    build: Callable[[dict, str], Any] | None = None  # (constructor kwargs or a shipped config, variant) -> the model
    #                                                  (tiny models: variant ""; default: the diffusers class)
    aliases: dict[str, str] = field(default_factory=dict)  # short names (bench --arch) -> variant names
    experts: bool = False                        # two transformers of one architecture load as one model: `build`
    #                                              with `boundary_ratio` in its config (Wan 2.2 A14B's experts)
    refuse_variant: Callable[[dict, str, str], str | None] | None = None  # (config, variant the files are,
    #                                              variant requested) -> why they cannot be it (None: they can);
    #                                              None: any requested variant is taken
    context_modules: tuple[str, ...] = ()        # modules that only see the conditioning (globs over module names;
    #                                              `*` crosses dots): computed once per job (context_cache.py)
    extra: dict[str, Any] = field(default_factory=dict)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    @property
    def default_variant(self) -> Variant:
        return self.variants[0]

    def latent_of(self, variant: str | None) -> LatentFormat:
        v = next((v for v in self.variants if v.name == variant), None)
        return v.latent if v is not None and v.latent is not None else self.latent
