"""Published H100-80GB Megatron-Bridge recipes, held against `kat plan` (issue 20, docs/scaling.md).

`.venv/bin/python -m kat_megatron.planning.recipes` prints the table of docs/scaling.md
("Published recipes"); `tests/planning/test_recipes.py` recomputes it and checks the doc.

Plan-only models: these are the public architectures' shapes as kat `ModelConfig`s, kept out of
`config/presets.py` (kat does not train them: GPT-OSS's attention sinks, sliding-window layers,
expert biases and clamped SwiGLU have no kat equivalent and are approximated, see below).
Every published figure names its source (repository + path, commit where read); a figure the
source does not give is `None` and prints "not published".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kat_megatron.config.schema import ModelConfig
from kat_megatron.planning.layout import Layout, check_layout
from kat_megatron.planning.planner import GIB, LayoutPlan, PlanOptions, evaluate, plan

MB = "NVIDIA-NeMo/Megatron-Bridge"
SUMMARY = f"{MB} docs/performance-summary.md @00b7660 (25.11, DGX-H100)"
LLAMA3_CFG = f"{MB} scripts/performance/configs/llama/llama3_workload_base_configs.py @00919dc"
LLAMA31_CFG = f"{MB} scripts/performance/configs/llama31/workload_base_configs.py"
QWEN3_CFG = f"{MB} scripts/performance/configs/qwen/qwen3_workload_base_configs.py @01b2977"
QWEN3_CARD = f"{MB} docs/models/qwen/qwen3-30b-a3b.md @411ee45 (Benchmark · H100)"
GPTOSS_CFG = f"{MB} scripts/performance/configs/gpt_oss/gpt_oss_workload_base_configs.py"
LLAMA31_RECIPE = f"{MB} src/megatron/bridge/recipes/llama/llama3.py llama31_405b_pretrain_config"
QWEN3_RECIPE = (
    f"{MB} src/megatron/bridge/recipes/qwen/h100/qwen3_moe.py "
    "qwen3_235b_a22b_pretrain_256gpu_h100_bf16_config @04eb4f8"
)
QWEN3_PERF = f"{MB} scripts/performance/configs/qwen/qwen3_llm_pretrain.py set_qwen3_common_configs"
GPTOSS_PERF = f"{MB} scripts/performance/configs/gpt_oss/gpt_oss_llm_pretrain.py (common configs)"
LLAMA3_SFT = (
    f"{MB} scripts/performance/configs/llama/llama3_llm_finetune.py llama3_70b_sft_config_h100"
)
GRAD_BF16 = (
    "ddp.grad_reduce_in_fp32 = False: the perf scripts' set_*_common_configs (llama3, llama31, "
    "qwen3, gpt_oss), llama3_llm_finetune.py, and the Qwen3-30B-A3B 16-GPU recipe"
)
_EMB_LOSS = dict(
    account_for_embedding_in_pipeline_split=True, account_for_loss_in_pipeline_split=True
)

_LLAMA = dict(
    preset=None,
    num_query_groups=8,
    vocab_size=128256,
    add_qkv_bias=False,
    rotary_base=500_000.0,
    norm_epsilon=1e-5,
    max_position_embeddings=8192,
)
LLAMA3_70B = ModelConfig(
    **_LLAMA, num_layers=80, hidden_size=8192, num_attention_heads=64, ffn_hidden_size=28672
)
LLAMA31_405B = ModelConfig(
    **_LLAMA, num_layers=126, hidden_size=16384, num_attention_heads=128, ffn_hidden_size=53248
)
_QWEN3_MOE = dict(
    preset=None,
    kv_channels=128,
    vocab_size=151936,
    add_qkv_bias=False,
    qk_layernorm=True,
    num_query_groups=4,
    num_moe_experts=128,
    moe_router_topk=8,
    moe_shared_expert_intermediate_size=None,
    max_position_embeddings=40960,
)
QWEN3_30B_A3B = ModelConfig(
    **_QWEN3_MOE,
    num_layers=48,
    hidden_size=2048,
    num_attention_heads=32,
    ffn_hidden_size=6144,
    moe_ffn_hidden_size=768,
)
QWEN3_235B_A22B = ModelConfig(
    **_QWEN3_MOE,
    num_layers=94,
    hidden_size=4096,
    num_attention_heads=64,
    ffn_hidden_size=12288,
    moe_ffn_hidden_size=1536,
)
# GPT-OSS-120B approximated: QKV bias kept; attention sinks (64 scalars per layer), the
# 128-token sliding window on alternate layers (FLOPs over-counted there) and the expert
# biases are left out; its clamped SwiGLU counted as SwiGLU.
GPT_OSS_120B = ModelConfig(
    preset=None,
    num_layers=36,
    hidden_size=2880,
    num_attention_heads=64,
    num_query_groups=8,
    kv_channels=64,
    ffn_hidden_size=2880,
    vocab_size=201088,
    add_qkv_bias=True,
    rotary_base=150_000.0,
    num_moe_experts=128,
    moe_router_topk=4,
    moe_ffn_hidden_size=2880,
    moe_shared_expert_intermediate_size=None,
    max_position_embeddings=131072,
)


@dataclass(frozen=True)
class Published:
    """What the source gives for one run (None: not published)."""

    tokens_per_s_gpu: float | None = None
    tflops_per_gpu: float | None = None
    step_s: float | None = None
    peak_gib: float | None = None
    """A measured peak allocated memory per GPU (`torch.cuda.max_memory_allocated`)."""
    peak_bound_gib: float | None = None
    """An upper bound the source states instead of a measurement."""


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelConfig
    layout: Layout
    gpus: int
    seq_len: int
    global_batch: int
    micro_batch: int
    recompute: str
    """kat's nearest setting to the recipe's (`none` where the recipe sets none)."""
    precision: str
    """`BF16`, or `FP8-CS` (Megatron-Bridge's `bf16_with_fp8_current_scaling_mixed`: FP8 hybrid,
    per-tensor current scaling, every layer in FP8, FP8 primary weights: the perf scripts'
    `get_precision_config("fp8_cs")` in scripts/performance/utils/precision.py sets
    `fp8_param_gather=True` and `first_last_layers_bf16=False`): kat's `model.fp8=hybrid`,
    `model.fp8_recipe=tensorwise`, `model.fp8_param=true` (`planning_model`)."""
    source: str
    published: Published = field(default_factory=Published)
    note: str = ""
    grad_reduce_dtype: str = "bf16"
    """Every recipe here sets `ddp.grad_reduce_in_fp32 = False` (the perf scripts' common
    settings, and the Qwen3-30B-A3B 16-GPU recipe itself)."""
    moe_load_factor: float = 1.2
    """kat's default for dropless routing; 1.0 where the run forces balanced routing
    (`moe_router_force_load_balancing = True`: random router logits, a benchmark setting)."""

    def options(self, recompute: str | None = None) -> PlanOptions:
        return PlanOptions(
            gpus=self.gpus,
            seq_len=self.seq_len,
            global_batch=self.global_batch,
            micro_batch=self.micro_batch,
            recompute=recompute or self.recompute,
            overlap_grad_reduce=True,  # Megatron-Bridge's perf recipes overlap DP communication
            grad_reduce_dtype=self.grad_reduce_dtype,
            moe_load_factor=self.moe_load_factor,
        )

    @property
    def planning_model(self) -> ModelConfig:
        """The model as kat would train it at this precision."""
        if self.precision == "FP8-CS":
            return replace(self.model, fp8="hybrid", fp8_recipe="tensorwise", fp8_param=True)
        return self.model

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "Llama-3-70B pretrain",
        LLAMA3_70B,
        Layout(tp=4, pp=8, vpp=5, dp=2),
        64,
        8192,
        128,
        1,
        "none",
        "FP8-CS",
        f"{SUMMARY}; layout also {LLAMA3_CFG} H100_FP8_CS_V1",
        Published(tokens_per_s_gpu=1602, tflops_per_gpu=719),
    ),
    Recipe(
        "Llama-3-70B pretrain (BF16)",
        LLAMA3_70B,
        Layout(tp=4, pp=4, vpp=5, cp=2, dp=2),
        64,
        8192,
        128,
        1,
        "none",
        "BF16",
        f"{LLAMA3_CFG} H100_BF16_V1 (sequence length from the FP8 row of {SUMMARY})",
        Published(),
        "layout only: the summary publishes the FP8-CS run's throughput, not this one's",
    ),
    Recipe(
        "Llama-3.1-405B pretrain",
        LLAMA31_405B,
        Layout(tp=8, pp=8, vpp=8, cp=2, dp=8, **_EMB_LOSS),
        1024,
        8192,
        512,
        1,
        "none",
        "FP8-CS",
        f"{SUMMARY}; layout also {LLAMA31_CFG} H100_BF16_V1 / FP8_CS_V1; embedding and loss "
        f"as pipeline layers: {LLAMA31_RECIPE}",
        Published(tokens_per_s_gpu=292, tflops_per_gpu=737),
        "126 + 2 = 128 = 8 x 8 x 2: the embedding and the loss count as pipeline layers",
    ),
    Recipe(
        "Qwen3-30B-A3B pretrain",
        QWEN3_30B_A3B,
        Layout(tp=1, pp=1, ep=16, etp=1, dp=16),
        16,
        4096,
        1024,
        1,
        "none",
        "BF16",
        f"{QWEN3_CARD}; layout also {QWEN3_CFG} H100_BF16_V1",
        Published(
            tokens_per_s_gpu=13011.378, tflops_per_gpu=299.352, step_s=20.14729, peak_bound_gib=65.0
        ),
        "the card states 'peak allocated memory remains below 65 GiB/GPU' (a bound, no "
        "measured value); issue 20's 57.1 GiB has no source found here",
    ),
    Recipe(
        "Qwen3-235B-A22B pretrain",
        QWEN3_235B_A22B,
        Layout(tp=2, pp=8, vpp=4, ep=32, etp=1, dp=16, **_EMB_LOSS),
        256,
        4096,
        2048,
        1,
        "none",
        "FP8-CS",
        f"{SUMMARY} (row lacks its GBS); GBS and layout {QWEN3_CFG} H100_FP8_CS_V1; embedding "
        f"and loss as pipeline layers, forced load balancing: {QWEN3_RECIPE}, {QWEN3_PERF}",
        Published(tokens_per_s_gpu=1575, tflops_per_gpu=233),
        "94 + 2 = 96 = 8 x 4 x 3: the embedding and the loss count as pipeline layers",
        moe_load_factor=1.0,
    ),
    Recipe(
        "GPT-OSS-120B pretrain",
        GPT_OSS_120B,
        Layout(tp=1, pp=4, ep=8, etp=1, dp=16),
        64,
        4096,
        512,
        1,
        "selective",
        "BF16",
        f"{SUMMARY}; layout and MBS {GPTOSS_CFG} @1e7adfa H100_BF16_V1 (BASE micro_batch_size=1, "
        f"recompute_modules layernorm, moe_act); forced load balancing: {GPTOSS_PERF}",
        Published(tokens_per_s_gpu=5630, tflops_per_gpu=153),
        "recipe recomputes layernorm + moe_act; kat's nearest is selective (core_attn + moe_act); "
        "the summary's row says MBS 4 and GA 2, which PP4 on 64 GPUs cannot both have (GBS 512 / "
        "(4 x DP16) = 8): the workload config's MBS 1 is used",
        moe_load_factor=1.0,
    ),
    Recipe(
        "Llama-3-70B SFT",
        LLAMA3_70B,
        Layout(tp=4, pp=4, vpp=5, dp=2),
        32,
        4096,
        32,
        1,
        "none",
        "BF16",
        f"{LLAMA3_CFG} _LLAMA3_70B_SFT_CONFIG_H100; sequence length 4096 (packed) and bf16 "
        f"gradient reduction: {LLAMA3_SFT}",
        Published(),
        "no throughput or peak memory published for this recipe in the sources read",
    ),
)


@dataclass
class RecipeRow:
    recipe: Recipe
    invalid: str | None
    own: LayoutPlan | None
    """The published layout at the recipe's own recompute setting."""
    rank: int | None
    """1-based position of the published layout among kat's fitting layouts (recompute auto);
    None when it is not among them."""
    fitting: int
    stand_in: Layout | None = None
    """Where kat cannot express the published pipeline split: the layout evaluated instead
    (same sizes, the largest VPP kat can split the layers for)."""

    @property
    def memory_gib(self) -> float | None:
        return None if self.own is None else self.own.memory.total / GIB

    @property
    def allocated_gib(self) -> float | None:
        """kat's estimate of the peak allocated tensors (`StageMemory.allocated`): the figure a
        published "peak allocated memory" is held against."""
        return None if self.own is None else self.own.memory.allocated / GIB

    @property
    def step_ratio(self) -> float | None:
        """kat's step time / the published step time (published tokens per GPU-second)."""
        pub = self.recipe.published
        if self.own is None or not pub.tokens_per_s_gpu:
            return None
        measured = self.recipe.tokens_per_step / (pub.tokens_per_s_gpu * self.recipe.gpus)
        return self.own.cost.step_s / measured


def _same(a: Layout, b: Layout) -> bool:
    """Equal sizes (TP, PP, DP, VPP, EP, ETP, CP), whichever pipeline split each uses."""
    key = ("tp", "pp", "dp", "vpp", "ep", "cp")
    return all(getattr(a, k) == getattr(b, k) for k in key) and a.etp_size == b.etp_size


def _with_split(model: ModelConfig, lay: Layout) -> Layout:
    """`lay`, or where it states no split and PP x VPP does not divide the layers, with kat's
    (`layout.split_fields`)."""
    from kat_megatron.planning.layout import split_fields

    if lay.uneven or lay.accounted:
        return lay
    fields = split_fields(model.num_layers, lay.pp, lay.vpp)
    return replace(lay, **dict(fields or ()))


def assess(recipe: Recipe) -> RecipeRow:
    """kat's verdict on one published recipe."""
    opts, model = recipe.options(), recipe.planning_model
    lay = _with_split(model, recipe.layout)
    why = check_layout(model, lay, opts.cluster, opts.batch)
    stand_in = None
    if why:  # evaluate the nearest layout kat can express, and say so
        for v in range(recipe.layout.chunks - 1, 0, -1):
            cand = _with_split(model, replace(recipe.layout, vpp=v if v > 1 else None))
            if check_layout(model, cand, opts.cluster, opts.batch) is None:
                stand_in = lay = cand
                break
        else:
            return RecipeRow(recipe, why, None, None, 0)
    own = evaluate(model, lay, opts)
    fits = plan(model, recipe.options("auto")).fitting
    rank = next((i + 1 for i, p in enumerate(fits) if _same(p.layout, lay)), None)
    return RecipeRow(recipe, why, own, rank, len(fits), stand_in)


def _pub(x: float | None, fmt: str) -> str:
    return "not published" if x is None else format(x, fmt)


def table(rows: list[RecipeRow]) -> str:
    """The markdown table of docs/scaling.md (kat columns computed, published ones quoted)."""
    head = (
        "| recipe | GPUs | published layout | seq × GBS / MBS | recompute | kat verdict "
        "| kat rank | kat memory GiB (allocated) | published peak allocated GiB "
        "| published tok/s/GPU (TFLOP/s) | kat step s / published |"
        "\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    out = [head]
    for r in rows:
        rc, pub = r.recipe, r.recipe.published
        verdict = "fits" if r.own and r.own.fits else "does not fit"
        if r.invalid:
            verdict = "invalid (PP x VPP split)"
            if r.stand_in:
                verdict += f"; stand-in {r.stand_in.label()}: " + (
                    "fits" if r.own.fits else "does not fit"
                )
        rank = f"{r.rank} of {r.fitting}" if r.rank else f"not in {r.fitting} fits"
        peak = _pub(pub.peak_gib, ".1f")
        if pub.peak_gib is None and pub.peak_bound_gib is not None:
            peak = f"< {pub.peak_bound_gib:.0f} (bound)"
        tput = _pub(pub.tokens_per_s_gpu, ".0f")
        if pub.tflops_per_gpu is not None:
            tput += f" ({pub.tflops_per_gpu:.0f})"
        ratio = "" if r.step_ratio is None else f"{r.step_ratio:.2f}"
        mem = "" if r.memory_gib is None else f"{r.memory_gib:.1f} ({r.allocated_gib:.1f})"
        out.append(
            f"| {rc.name} | {rc.gpus} | {rc.layout.label()} | {rc.seq_len} × {rc.global_batch}"
            f" / {rc.micro_batch} | {rc.recompute} | {verdict} | {rank} | {mem} | {peak} "
            f"| {tput} | {ratio or 'not published'} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    print(table([assess(r) for r in RECIPES]))
