"""The family matrix's table: per model family, the tiny model, the odd sizes and masks its cases use, which cases
apply and the bounds that differ. tests/test_family_matrix.py runs every family's cases through the same checks;
a new family adds its row here (see docs/testing.md).

A case is a tests/cases.py dict with three more keys: "family" (its row), "world" (2 or 4) and "check", the matrix
check it goes through:
  exact    equal to serial sampling (<= 1e-4), with the bytes each parallel degree exchanged
  stale    PipeFusion's stale phase: equal to tests/pipefusion_reference.py (<= 1e-4), and not serial
  hybrid   a stale PipeFusion hybrid at world 4: equal to plain PipeFusion 2 ("twin", a world-2 case), not serial
  cache    the step cache on ranks: the serial run's reuse decisions and result ("expect": see CacheCheck)
  analyse  the analyser under Ulysses: the serial profile
  None     launched for a family file's own check (tests/test_<family>.py reads it with `matrix.result`)
Each family's cases run in one torchrun launch per world size for every family together (`Runs`), so a family
costs no launch of its own.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from pipefusion_error import stale_cases  # noqa: E402

STALE_FLOOR = 1e-3  # a stale run (or hybrid) differs from serial by more than this: stale K/V really used


@dataclass(frozen=True)
class Bench:
    """bench.py at full size on the meta device (its parameter count) and the tiny model on CPU against the model
    called as its diffusers pipeline calls it."""
    arch: str                 # build_random's name for the published model
    params: float             # its parameter count
    rel: float                # relative tolerance on it
    size: object              # the tiny run's size (int or (height, width))
    frames: int = 1
    facts: dict = field(default_factory=dict)  # adapter attributes of the full-size model


@dataclass(frozen=True)
class Row:
    model: str
    cases: list[dict]            # every case of the family, world 2 and 4
    bench: Bench | None = None
    analyse_finite: str = "all"  # profile arrays required finite after step 0: "all", or only "residual" ones


def _tag(family: str, world: int, check: str | None, cases: list[dict], **more) -> list[dict]:
    return [{**c, "id": f"{family}.{c['id']}", "family": family, "world": world, "check": check, **more}
            for c in cases]


# ------------------------------------------------------------------------------------------------ flux, sd3, pixart
def _tiny(family: str, model: str) -> list[dict]:
    """Flux.1, SD3, PixArt: 112x144 (7x9 = 63 image tokens) and 15 text tokens, neither divisible by 2 or 4."""
    odd, square = dict(height=112, width=144, text_tokens=15), dict(height=128, width=128)
    w2 = [("ulysses2", {"ulysses": 2}, odd, {}), ("ring2", {"ring": 2}, odd, {}),
          ("cfg2", {"cfg": 2}, square, {"cfg": 3.0}), ("dp2", {"dp": 2}, square, {"batch": 3})]
    w4 = [("ulysses2_ring2", {"ulysses": 2, "ring": 2}, odd, {"cfg": 2.5}),
          ("cfg2_ulysses2", {"cfg": 2, "ulysses": 2}, square, {"cfg": 3.0, "batch": 2}),
          ("ulysses4", {"ulysses": 4}, odd, {}), ("ring4", {"ring": 4}, odd, {})]

    def build(configs):
        return [{"id": name, "model": model, "seed": 11, "steps": 3, "parallel": par, **size, **extra}
                for name, par, size, extra in configs]

    # even shards for test_parallel's analytic byte counts (which read these runs too)
    bytes_case = {"flux": [{"id": "bytes_ulysses2", "model": model, "seed": 1, "steps": 2, "parallel": {"ulysses": 2},
                            **square}],
                  "sd3": [{"id": "bytes_ring2", "model": model, "seed": 1, "steps": 2, "parallel": {"ring": 2},
                           **square}]}.get(family, [])
    # SD3 with a negative of another token count (test_parallel's own check)
    negative = [{"id": f"neg_{name}", "model": model, "seed": 7, "steps": 3, "parallel": par, **odd, "cfg": 3.0,
                 "neg_text_tokens": 7}
                for name, par in (("ulysses2", {"ulysses": 2}), ("ring2", {"ring": 2}), ("cfg2", {"cfg": 2}),
                                  ("pf2", {"pipefusion": 2, "num_patches": 2, "warmup_steps": 3}))
                if family == "sd3"]
    return (_tag(family, 2, "exact", build(w2) + bytes_case) + _tag(family, 4, "exact", build(w4))
            + _tag(family, 2, None, negative))


# ------------------------------------------------------------------------------------------------ FLUX.2
FLUX2_ODD = dict(height=112, width=144, text_tokens=15)  # 7 x 9 = 63 image tokens, 15 text tokens
SQUARE = dict(height=128, width=128)
# tiny-flux2 is 2 double + 2 single blocks of equal work per image token, so PipeFusion 2 splits these in half:
# 4 + 2 blocks: the boundary after the 3rd double block; 2 + 2: at the switch; 1 + 3: after the 1st single block
FLUX2_BOUNDARY = {"double": {"num_layers": 4, "num_single_layers": 2}, "switch": {},
                  "single": {"num_layers": 1, "num_single_layers": 3}}
FLUX2_CACHE = {"model": "tiny-flux2", "seed": 5, "steps": 8, **SQUARE}  # test_flux2's step-cache base


def _flux2() -> list[dict]:
    m = {"model": "tiny-flux2"}
    exact2 = [{**m, "id": "ulysses2", "seed": 11, "steps": 3, "parallel": {"ulysses": 2}, **FLUX2_ODD},
              {**m, "id": "ring2", "seed": 11, "steps": 3, "parallel": {"ring": 2}, **FLUX2_ODD},
              {**m, "id": "dp2", "seed": 11, "steps": 3, "parallel": {"dp": 2}, "batch": 3, **FLUX2_ODD}]
    stale2 = []
    for where, overrides in FLUX2_BOUNDARY.items():
        base = {**m, "seed": 3, "steps": 4, **SQUARE, "overrides": overrides}
        exact2 += [{**base, "id": f"pf2_{where}_m1", "parallel": {"pipefusion": 2, "num_patches": 1}},
                   {**base, "id": f"pf2_{where}_allwarm", "parallel": {"pipefusion": 2, "num_patches": 2,
                                                                        "warmup_steps": 4}}]
        stale2 += [{**base, "steps": 8, "id": f"pf2_{where}_m2_w1", "parallel": {"pipefusion": 2, "num_patches": 2,
                                                                                  "warmup_steps": 1}},
                   {**base, "steps": 8, "id": f"pf2_{where}_m4_w2", "parallel": {"pipefusion": 2, "num_patches": 4,
                                                                                  "warmup_steps": 2}}]
    hybrid = {**m, "seed": 4, "steps": 4, "height": 128, "width": 160}
    # the stale twin of the world-4 hybrid: same patches and warm-up, plain pipefusion 2
    stale2.append({**hybrid, "id": "pf2_twin", "parallel": {"pipefusion": 2, "num_patches": 2, "warmup_steps": 1}})
    w4 = {**m, "seed": 13, "steps": 3}
    exact4 = [{**w4, "id": "ulysses2_ring2", "parallel": {"ulysses": 2, "ring": 2}, **FLUX2_ODD},
              {**w4, "id": "ulysses4", "parallel": {"ulysses": 4}, **FLUX2_ODD},
              {**w4, "id": "ring4", "parallel": {"ring": 4}, **FLUX2_ODD},
              {**w4, "id": "dp2_ulysses2", "parallel": {"dp": 2, "ulysses": 2}, "batch": 2, **FLUX2_ODD},
              # one block per stage: boundaries inside the double blocks, at the switch and inside the single blocks
              {**w4, "id": "pf4_m1", "steps": 4, "parallel": {"pipefusion": 4, "num_patches": 1}, **SQUARE},
              {**hybrid, "id": "pf2_ulysses2_exact", "parallel": {"pipefusion": 2, "ulysses": 2, "num_patches": 2,
                                                                   "warmup_steps": 4}},
              {**hybrid, "id": "pf2_ring2_exact", "parallel": {"pipefusion": 2, "ring": 2, "num_patches": 2,
                                                                "warmup_steps": 4}},
              {**hybrid, "id": "pf2_dp2", "batch": 2, "parallel": {"pipefusion": 2, "dp": 2, "num_patches": 1}}]
    stale4 = [{**w4, "id": "pf4_m4_w1", "seed": 3, "steps": 8, "parallel": {"pipefusion": 4, "num_patches": 4,
                                                                             "warmup_steps": 1}, **SQUARE}]
    hybrids = [{**hybrid, "id": "pf2_ulysses2_stale", "parallel": {"pipefusion": 2, "ulysses": 2, "num_patches": 2,
                                                                    "warmup_steps": 1}}]
    cache = [{**FLUX2_CACHE, "id": "cache_ulysses2", "parallel": {"ulysses": 2}, "cache": {"threshold": 0.8}},
             {**FLUX2_CACHE, "id": "cache_pf2", "parallel": {"pipefusion": 2, "num_patches": 2},
              "cache": {"threshold": 0.8}, "expect": "stage0"}]
    analyse = [{**m, "id": "analyze_ulysses2", "seed": 2, "steps": 3, "prompts": 2, "analyze": True,
                "parallel": {"ulysses": 2}, **FLUX2_ODD}]
    refused = [{**m, "id": "cfg2", "seed": 11, "steps": 3, "parallel": {"cfg": 2}, "cfg": 3.0, **SQUARE}]
    return (_tag("flux2", 2, "exact", exact2) + _tag("flux2", 2, "stale", stale2) + _tag("flux2", 2, "cache", cache)
            + _tag("flux2", 2, "analyse", analyse) + _tag("flux2", 2, None, refused)
            + _tag("flux2", 4, "exact", exact4) + _tag("flux2", 4, "stale", stale4)
            + _tag("flux2", 4, "hybrid", hybrids, twin="flux2.pf2_twin"))


# ------------------------------------------------------------------------------------------------ Qwen-Image
# 112x144 -> 7x9 = 63 image tokens (no degree divides it). 15 text tokens: shards 8|7 (2 ranks), 4|4|4|3 (4); row 0
# pads tokens 3-5 (rank 0; ranks 0 and 1 of 4) and 12-14 (the last rank), row 1 tokens 7-10 (across a shard
# boundary), row 2 only the last two. The negative has 9 tokens, padded at its end (the last ranks) or inside.
QWEN_POS = [[1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1],
            [1] * 13 + [0, 0]]
QWEN_NEG = [[1, 1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 1, 1, 1, 1], [1] * 9]
QWEN_CACHE = {"threshold": 1.2}  # tiny random weights change a lot between steps: reuses steps 1-3


def qwen_case(cid: str, parallel: dict, batch: int = 1, cfg: float = 3.0, steps: int = 3, **more) -> dict:
    return {"id": cid, "model": "tiny-qwen-image", "seed": 11, "steps": steps, "batch": batch, "cfg": cfg,
            "masks": {"cond_mask": QWEN_POS[:batch], "neg_cond_mask": QWEN_NEG[:batch]}, "parallel": parallel,
            "height": 112, "width": 144, **more}


def _qwen() -> list[dict]:
    exact2 = [qwen_case("ulysses2", {"ulysses": 2}), qwen_case("ring2", {"ring": 2}, batch=2, cfg=1.0),
              qwen_case("cfg2", {"cfg": 2}), qwen_case("dp2", {"dp": 2}, batch=3),
              qwen_case("pf2_m1", {"pipefusion": 2, "num_patches": 1}),
              qwen_case("pf2_allwarm", {"pipefusion": 2, "num_patches": 2, "warmup_steps": 3})]
    twin = qwen_case("pf2_twin", {"pipefusion": 2, "num_patches": 2, "warmup_steps": 1})  # the hybrids' twin
    exact4 = [qwen_case("ulysses2_ring2", {"ulysses": 2, "ring": 2}, cfg=2.5),
              qwen_case("cfg2_ulysses2", {"cfg": 2, "ulysses": 2}, batch=2),
              qwen_case("ulysses4", {"ulysses": 4}), qwen_case("ring4", {"ring": 4}, batch=2, cfg=1.0),
              qwen_case("dp2_ring2", {"dp": 2, "ring": 2}, batch=2)]
    hybrids = []
    for name, extra in (("ulysses2", {"ulysses": 2}), ("ring2", {"ring": 2}), ("cfg2", {"cfg": 2})):
        exact4.append(qwen_case(f"pf2_{name}_exact", {"pipefusion": 2, "num_patches": 2, "warmup_steps": 3, **extra}))
        hybrids.append(qwen_case(f"pf2_{name}_stale", {"pipefusion": 2, "num_patches": 2, "warmup_steps": 1, **extra}))
    cache = [{**qwen_case("cache_ulysses2", {"ulysses": 2}, steps=8), "height": 128, "width": 128,
              "cache": QWEN_CACHE}]
    return (_tag("qwen-image", 2, "exact", exact2) + _tag("qwen-image", 2, "stale", stale_cases("qwen-image") + [twin])
            + _tag("qwen-image", 2, "cache", cache) + _tag("qwen-image", 4, "exact", exact4)
            + _tag("qwen-image", 4, "hybrid", hybrids, twin="qwen-image.pf2_twin"))


# ------------------------------------------------------------------------------------------------ Z-Image
# The transformer pads its image and text sequences to multiples of 32 itself: 112x144 (63 image tokens) and 15
# text tokens run as 64 and 32 tokens with learned pad tokens; negatives of 40 tokens (64 inside) test branches of
# different lengths.
ZI_ODD = dict(height=112, width=144, text_tokens=15)
ZI_SHORT_NEG = dict(cfg=3.0, neg_text_tokens=40)
ZI_CACHE_MASK = [True, True, False, True, False, True]
ZI_CACHE = {"model": "tiny-z-image", "seed": 5, "steps": 6, "cfg": 3.0, **SQUARE}
ZI_ANALYZE = {"model": "tiny-z-image", "seed": 21, "steps": 3, "height": 64, "width": 64, "prompts": 2,
              "analyze": True}


def _z_image() -> list[dict]:
    base = {"model": "tiny-z-image", "seed": 11, "steps": 3}
    exact2 = [{**base, "id": "ulysses2", "parallel": {"ulysses": 2}, **ZI_ODD, **ZI_SHORT_NEG},
              {**base, "id": "ring2", "parallel": {"ring": 2}, **ZI_ODD},
              {**base, "id": "cfg2", "parallel": {"cfg": 2}, **SQUARE, **ZI_SHORT_NEG},
              {**base, "id": "dp2", "parallel": {"dp": 2}, **SQUARE, "batch": 3},
              {**base, "id": "pf2_m1", "parallel": {"pipefusion": 2, "num_patches": 1}, **SQUARE, **ZI_SHORT_NEG},
              # every step synchronous: patches of 4 | 3 rows, the last one with the image stream's pad token
              {**base, "id": "pf2_allwarm", "steps": 4, "parallel": {"pipefusion": 2, "num_patches": 2,
                                                                       "warmup_steps": 4}, **ZI_ODD, **ZI_SHORT_NEG}]
    pf = {"pipefusion": 2, "num_patches": 2, "warmup_steps": 3}
    exact4 = [{**base, "id": "ulysses2_ring2", "parallel": {"ulysses": 2, "ring": 2}, **ZI_ODD, **ZI_SHORT_NEG,
               "cfg": 2.5},
              {**base, "id": "cfg2_ulysses2", "parallel": {"cfg": 2, "ulysses": 2}, **SQUARE, **ZI_SHORT_NEG,
               "batch": 2},
              {**base, "id": "ulysses4", "parallel": {"ulysses": 4}, **ZI_ODD},
              {**base, "id": "ring4", "parallel": {"ring": 4}, **ZI_ODD},
              {**base, "id": "dp2_ring2", "parallel": {"dp": 2, "ring": 2}, **ZI_ODD, "batch": 2},
              {**base, "id": "pf2_ulysses2", "parallel": {**pf, "ulysses": 2}, **ZI_ODD, **ZI_SHORT_NEG},
              {**base, "id": "pf2_ring2", "parallel": {**pf, "ring": 2}, **ZI_ODD, **ZI_SHORT_NEG},
              {**base, "id": "pf2_cfg2", "parallel": {**pf, "cfg": 2}, **ZI_ODD, **ZI_SHORT_NEG}]
    # stale hybrids at world 4 and their plain pipefusion 2 twin (the same patches and warm-up) at world 2
    stale = {"model": "tiny-z-image", "seed": 4, "steps": 4, "height": 128, "width": 160, **ZI_SHORT_NEG}
    stale_pf = {"pipefusion": 2, "num_patches": 2, "warmup_steps": 1}
    stale_ids = ["z-image_s8_m2_w1", "z-image_s8_m2_w2", "z-image_s8_m4_w1", "z-image_s8_m4_w2"]
    stale2 = [c for c in stale_cases("z-image") if c["id"] in stale_ids] + [{**stale, "id": "stale_twin",
                                                                              "parallel": stale_pf}]
    hybrids = [{**stale, "id": k, "parallel": {**stale_pf, **v}}
               for k, v in {"pf2_ulysses2_stale": {"ulysses": 2}, "pf2_ring2_stale": {"ring": 2},
                            "pf2_cfg2_stale": {"cfg": 2}}.items()]
    cache = [{**ZI_CACHE, "id": "cache_ulysses2", "parallel": {"ulysses": 2}, "cache": {"mask": ZI_CACHE_MASK}},
             # threshold 0: nothing reused, the plain pipefusion result of its twin
             {**ZI_CACHE, "id": "cache_pf2", "parallel": stale_pf, "cache": {"threshold": 0.0}, "expect": "none",
              "twin": "z-image.cache_pf2_twin"}]
    cache_twin = [{**ZI_CACHE, "id": "cache_pf2_twin", "parallel": stale_pf}]
    analyse = [{**ZI_ANALYZE, "id": "analyze_ulysses2", "parallel": {"ulysses": 2}}]
    return (_tag("z-image", 2, "exact", exact2) + _tag("z-image", 2, "stale", stale2)
            + _tag("z-image", 2, "cache", cache) + _tag("z-image", 2, None, cache_twin)
            + _tag("z-image", 2, "analyse", analyse) + _tag("z-image", 4, "exact", exact4)
            + _tag("z-image", 4, "hybrid", hybrids, twin="z-image.stale_twin"))


# ------------------------------------------------------------------------------------------------ Wan
# 9 frames (3 latent frames) of 48x80 pixels: 3 x 3 x 5 = 45 video tokens and 15 text tokens, divisible by neither
# 2 nor 4
WAN_ODD = dict(height=48, width=80, frames=9, text_tokens=15)
WAN_NEG = dict(cfg=4.0, neg_text_tokens=7)
WAN_I2V = {"in_channels": 36, "image_dim": 32, "added_kv_proj_dim": 64}  # tiny-wan as Wan 2.1 I2V (CLIP width 32)
WAN_CACHE_MASK = [True, True, False, True, False, True]
WAN_CACHE = {"model": "tiny-wan", "seed": 5, "steps": 6, **WAN_ODD, **WAN_NEG}
WAN_ANALYZE = {"model": "tiny-wan", "seed": 21, "steps": 3, **WAN_ODD, "prompts": 2, "analyze": True}


def _wan() -> list[dict]:
    experts, ti2v = "tiny-wan-a14b", "tiny-wan-ti2v"
    base = {"model": "tiny-wan", "seed": 11, "steps": 3, **WAN_ODD}
    allwarm = {"pipefusion": 2, "num_patches": 2, "warmup_steps": 3}
    exact2 = [{**base, "id": "ulysses2", "parallel": {"ulysses": 2}, **WAN_NEG},
              {**base, "id": "ring2", "parallel": {"ring": 2}, **WAN_NEG},
              {**base, "id": "cfg2", "parallel": {"cfg": 2}, **WAN_NEG},
              {**base, "id": "dp2", "parallel": {"dp": 2}, "batch": 3},
              # every step synchronous: patches of 5 | 4 token rows (the first ends inside the second frame)
              {**base, "id": "pf2_allwarm", "parallel": allwarm, **WAN_NEG},
              {**base, "id": "experts_ulysses2", "model": experts, "steps": 4, "parallel": {"ulysses": 2}, **WAN_NEG},
              {**base, "id": "experts_cfg2", "model": experts, "steps": 4, "parallel": {"cfg": 2}, **WAN_NEG},
              {**base, "id": "ti2v_ring2", "model": ti2v, "height": 96, "width": 160, "parallel": {"ring": 2},
               **WAN_NEG},
              {**base, "id": "ti2v_pf2_allwarm", "model": ti2v, "height": 96, "width": 160, "parallel": allwarm},
              {**base, "id": "i2v_ulysses2", "overrides": WAN_I2V, "text_tokens": 512, "cfg": 4.0,
               "neg_text_tokens": 512, "random_inputs": {"image_cond": [1, 20, 3, 6, 10], "image_embeds": [1, 257, 32]},
               "parallel": {"ulysses": 2}}]
    exact4 = [{**base, "id": "ulysses2_ring2", "parallel": {"ulysses": 2, "ring": 2}, **WAN_NEG},
              {**base, "id": "cfg2_ulysses2", "parallel": {"cfg": 2, "ulysses": 2}, **WAN_NEG, "batch": 2},
              {**base, "id": "ulysses4", "parallel": {"ulysses": 4}, **WAN_NEG},
              {**base, "id": "ring4", "parallel": {"ring": 4}},
              {**base, "id": "pf4_allwarm", "parallel": {"pipefusion": 4, "num_patches": 3, "warmup_steps": 3},
               **WAN_NEG, "overrides": {"num_layers": 4}},
              {**base, "id": "pf2_ulysses2_allwarm", "parallel": {"pipefusion": 2, "num_patches": 2, "warmup_steps": 3,
                                                                   "ulysses": 2}, **WAN_NEG},
              {**base, "id": "experts_ulysses2_ring2", "model": experts, "steps": 4,
               "parallel": {"ulysses": 2, "ring": 2}, **WAN_NEG},
              {**base, "id": "ti2v_ulysses2_ring2", "model": ti2v, "height": 96, "width": 160,
               "parallel": {"ulysses": 2, "ring": 2}, **WAN_NEG}]
    # PipeFusion 2 with stale K/V after one warm-up step: 9 token rows in 2 or 3 patches cross frame boundaries
    stale2 = [{"id": f"wan_s6_m{m}_w1", "model": "tiny-wan", "seed": 5, "steps": 6, **WAN_ODD, **WAN_NEG,
               "parallel": {"pipefusion": 2, "num_patches": m, "warmup_steps": 1}} for m in (2, 3)]
    cache = [{**WAN_CACHE, "id": "cache_ulysses2", "parallel": {"ulysses": 2}, "cache": {"mask": WAN_CACHE_MASK}},
             {**WAN_CACHE, "id": "cache_pf2", "parallel": {"pipefusion": 2, "num_patches": 2, "warmup_steps": 1},
              "cache": {"mask": WAN_CACHE_MASK}, "expect": "serial"}]
    analyse = [{**WAN_ANALYZE, "id": "analyze_ulysses2", "parallel": {"ulysses": 2}}]
    return (_tag("wan", 2, "exact", exact2) + _tag("wan", 2, "stale", stale2) + _tag("wan", 2, "cache", cache)
            + _tag("wan", 2, "analyse", analyse) + _tag("wan", 4, "exact", exact4))


# ------------------------------------------------------------------------------------------------ the table
FAMILIES: dict[str, Row] = {
    "flux": Row("tiny-flux", _tiny("flux", "tiny-flux")),
    "sd3": Row("tiny-sd3", _tiny("sd3", "tiny-sd3")),
    "pixart": Row("tiny-pixart", _tiny("pixart", "tiny-pixart")),
    "flux2": Row("tiny-flux2", _flux2(),
                 Bench("flux2", 32.22e9, 0.005, 64, facts={"variant": "flux2-dev", "block_count": 56})),
    "qwen-image": Row("tiny-qwen-image", _qwen(),
                      Bench("qwen-image", 20_430_401_088, 0.0, 64, facts={"block_count": 60, "num_heads": 24})),
    "z-image": Row("tiny-z-image", _z_image(),
                   Bench("z-image", 6.155e9, 1e-3, 128, facts={"num_heads": 30, "hidden_size": 3840,
                                                              "variant": "z-image-turbo"}),
                   analyse_finite="residual"),
    "wan": Row("tiny-wan", _wan(), Bench("wan-14b", 14.288e9, 1e-4, (48, 80), frames=9,
                                         facts={"variant": "wan2.1-t2v-14b"}),
               analyse_finite="residual"),
}
CASES: dict[str, dict] = {c["id"]: c for row in FAMILIES.values() for c in row.cases}


def cases(check: str) -> list[dict]:
    """Every family's cases that go through `check`, in table order."""
    return [c for c in CASES.values() if c["check"] == check]


def case_id(case: dict) -> str:
    return case["id"].replace(".", "-")


class Runs:
    """The launches: per world size one torchrun group for the cases the selected tests need, started on first use."""

    def __init__(self, needed: set[str], tmp_path_factory):
        self.needed, self.tmp, self.results = needed, tmp_path_factory, {}

    def world(self, world: int) -> dict:
        if world not in self.results:
            from tests.distributed import run_cases

            todo = [c for c in CASES.values() if c["world"] == world and c["id"] in self.needed]
            self.results[world] = run_cases(world, todo, self.tmp.mktemp(f"matrix{world}"), timeout=3600) \
                if todo else {}
        return self.results[world]

    def result(self, case_id: str) -> dict:
        """A case's result (its launch runs if it has not); the run must have succeeded."""
        info = self.world(CASES[case_id]["world"])[case_id]
        assert info["ok"], info.get("error")
        return info


def needed_by(item) -> set[str]:
    """The case ids a collected test needs: a matrix test's case (and its twin), or every case of the families a
    family file's test names with @pytest.mark.families(...)."""
    ids = set()
    params = getattr(getattr(item, "callspec", None), "params", {})
    case = params.get("case")
    if isinstance(case, dict) and case.get("id") in CASES:
        ids.add(case["id"])
        if "twin" in case:
            ids.add(case["twin"])
    marker = item.get_closest_marker("families")
    if marker is not None:
        ids |= {c["id"] for c in CASES.values() if c["family"] in marker.args}
    return ids
