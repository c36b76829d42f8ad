"""Typed configuration for every `kat train` run: `kat train CONFIG.yaml [key=value ...]`.

Each section is a dataclass whose fields carry a docstring-style comment; each validates its own
fields in `__post_init__` (ValueError for user errors). Checks that need two sections (TP against
attention heads, PP against layers, ...) live in `KatConfig.__post_init__`. What a stage needs
beyond that (its names, cross-section rules and the typed parts of `rl.*` and `kd.*`) is checked
by the stage registry, `kat_megatron/stages.py`, which imports the components: this module
imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        key = f"{section}.{name}" if section else name
        raise ValueError(f"{key}={value!r}: expected one of {list(allowed)}")


def _positive(section: str, name: str, value: Any, allow_zero: bool = False) -> None:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or value < (0 if allow_zero else 1):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{section}.{name}={value!r}: expected an integer {bound}")


@dataclass
class ModelConfig:
    """Architecture. `preset` fills every field; fields given beside it override the preset."""

    preset: str | None = "tiny-dense"
    """Name of a preset in `kat_megatron.config.presets` (kat-v1-40b, kat-200b-a40b, tiny-*)."""
    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    """Key/value heads (GQA groups); equal to num_attention_heads for MHA."""
    kv_channels: int | None = None
    """Per-head dimension; None means hidden_size // num_attention_heads."""
    ffn_hidden_size: int = 128
    vocab_size: int = 512
    """Tokenizer vocabulary; padded to `make_vocab_size_divisible_by * tp` for the embedding."""
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 4096
    rotary_base: float = 1_000_000.0
    add_qkv_bias: bool = True
    qk_layernorm: bool = False
    """RMSNorm/LayerNorm on each query and key head before RoPE (Qwen3's q_norm/k_norm)."""
    untie_embeddings_and_output_weights: bool = True
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-6
    activation: str = "swiglu"
    init_method_std: float = 0.02
    # --- Mixture of experts (num_moe_experts=None means dense) ---
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    """Hidden size of each routed expert; None means ffn_hidden_size."""
    moe_shared_expert_intermediate_size: int | None = None
    """Total hidden size of the shared expert(s); None means no shared expert."""
    moe_layer_freq: int = 1
    """Every n-th layer is MoE (1 = all layers)."""
    moe_first_k_dense: int = 0
    """The first k layers stay dense (as DeepSeek-V3 and our 200B design)."""
    moe_aux_loss_coeff: float = 1e-3
    moe_router_load_balancing_type: str = "aux_loss"
    moe_token_dispatcher_type: str = "alltoall"
    moe_router_dtype: str | None = "fp32"
    # --- Multi-token prediction ---
    mtp_num_layers: int | None = None
    """Number of MTP depths D (None or 0 disables MTP)."""
    mtp_loss_scaling_factor: float = 0.1
    # --- Kernels ---
    backend: str = "auto"
    """`te` (Transformer Engine), `local` (Megatron-Core torch layers) or `auto` (te if usable)."""
    attention: str = "sdpa"
    """Core attention of the local backend: `sdpa` (torch's scaled_dot_product_attention, fused
    kernels where torch has them; docs/attention.md) or `unfused` (Megatron-Core's
    DotProductAttention, the full score matrix: the reference). Ignored with backend te
    (Transformer Engine chooses its own fused attention)."""
    swiglu_fusion: bool | None = None
    """Megatron-Core's fused SwiGLU (`bias_activation_fusion`, `fusions/fused_bias_swiglu.py`):
    one autograd function keeps only FC1's output, so the MLP saves 3x its FFN width for
    backward instead of 5x (experts: 3x instead of 6x; docs/scaling.md). None: on with
    activation swiglu (Megatron-Core fuses SiLU only with a gated linear unit), off with gelu
    (true there is an error). On CPU the same function runs eagerly (`parallel/cpu_adapter.py`)."""
    fp8: str | None = None
    """None, `hybrid` or `e4m3` (needs backend te and CUDA)."""
    fp8_recipe: str = "delayed"
    """`delayed`, `tensorwise` or `blockwise`."""
    fp8_param: bool = False
    """FP8 primary weights (Megatron-Core's `fp8_param`, built under TE's `fp8_model_init`; DDP
    `fp8_param_gather`): the linear layers' parameters are TE Float8Tensors (1 byte each, the
    fp32 main copy stays in the optimizer), so no bf16 copy is kept beside the FP8 one and the
    distributed optimizer all-gathers FP8 bytes. Needs model.fp8 (Megatron-Bridge's `fp8_cs`
    precision sets it)."""

    def __post_init__(self) -> None:
        s = "model"
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "ffn_hidden_size",
            "vocab_size",
            "make_vocab_size_divisible_by",
            "max_position_embeddings",
        ):
            _positive(s, name, getattr(self, name))
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_query_groups={self.num_query_groups} must divide "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels"
            )
        _choice(s, "normalization", self.normalization, ("RMSNorm", "LayerNorm"))
        _choice(s, "activation", self.activation, ("swiglu", "gelu"))
        _choice(s, "backend", self.backend, ("auto", "te", "local"))
        _choice(s, "attention", self.attention, ("sdpa", "unfused"))
        _choice(s, "fp8", self.fp8, (None, "hybrid", "e4m3"))
        _choice(s, "fp8_recipe", self.fp8_recipe, ("delayed", "tensorwise", "blockwise"))
        _choice(
            s,
            "moe_router_load_balancing_type",
            self.moe_router_load_balancing_type,
            ("aux_loss", "seq_aux_loss", "none"),
        )
        _choice(
            s,
            "moe_token_dispatcher_type",
            self.moe_token_dispatcher_type,
            ("alltoall", "allgather"),
        )
        if self.num_moe_experts is not None:
            _positive(s, "num_moe_experts", self.num_moe_experts)
            if not 1 <= self.moe_router_topk <= self.num_moe_experts:
                raise ValueError(
                    f"model.moe_router_topk={self.moe_router_topk} must be in "
                    f"[1, model.num_moe_experts={self.num_moe_experts}]"
                )
            if self.moe_first_k_dense >= self.num_layers:
                raise ValueError(
                    f"model.moe_first_k_dense={self.moe_first_k_dense} leaves no MoE layer "
                    f"(model.num_layers={self.num_layers})"
                )
        if self.mtp_num_layers is not None:
            _positive(s, "mtp_num_layers", self.mtp_num_layers, allow_zero=True)
        if self.fp8 is not None and self.backend == "local":
            raise ValueError("model.fp8 needs Transformer Engine: set model.backend=te (or auto)")
        if self.fp8_param not in (True, False):
            raise ValueError(f"model.fp8_param={self.fp8_param!r}: expected true or false")
        if self.fp8_param and self.fp8 is None:
            raise ValueError(
                "model.fp8_param=true keeps the weights in FP8 and needs FP8 training: "
                "set model.fp8 (hybrid or e4m3)"
            )
        if self.swiglu_fusion not in (None, True, False):
            raise ValueError(
                f"model.swiglu_fusion={self.swiglu_fusion!r}: expected true, false or null"
            )
        if self.swiglu_fusion and self.activation != "swiglu":
            raise ValueError(
                f"model.swiglu_fusion=true needs model.activation=swiglu (got {self.activation}); "
                "Megatron-Core fuses only SiLU with a gated linear unit"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    @property
    def swiglu_fused(self) -> bool:
        """Whether the MLPs run Megatron-Core's fused SwiGLU (`swiglu_fusion` resolved)."""
        if self.swiglu_fusion is None:
            return self.activation == "swiglu"
        return self.swiglu_fusion

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


def expert_tp_size(tp: int, etp: int | None) -> int:
    """Expert tensor-parallel size in effect: `etp`, or `tp` when unset (Megatron-Core's
    default). `ParallelConfig.etp_size` and the planner's `Layout.etp_size`."""
    return etp or tp


@dataclass
class ParallelConfig:
    """Layout. world size = tp * pp * cp * dp, divisible by etp * ep * pp (Megatron-Core's rules:
    experts may spread over tensor-parallel ranks)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved 1F1B); None = plain 1F1B."""
    first_stage_layers: int | None = None
    """Decoder layers on the first pipeline stage (Megatron-Core's
    `num_layers_in_first_pipeline_stage`); None: an even share. The stages between the first
    and the last split the remaining layers evenly (`pipeline_split`)."""
    last_stage_layers: int | None = None
    """Decoder layers on the last pipeline stage (`num_layers_in_last_pipeline_stage`), e.g. fewer
    to make room for the output layer and loss; None: an even share."""
    account_for_embedding_in_pipeline_split: bool = False
    """Megatron-Core's option of the same name: the split counts the embedding as one more layer,
    placed first (the first virtual stage of the first rank builds one decoder layer fewer).
    Excludes `first_stage_layers` / `last_stage_layers` (`pipeline_split`)."""
    account_for_loss_in_pipeline_split: bool = False
    """Megatron-Core's option of the same name: the output layer and loss count as one more
    layer, placed last (the last virtual stage of the last rank builds one decoder layer fewer)."""
    ep: int = 1
    """Expert-parallel size (MoE)."""
    etp: int | None = None
    """Expert tensor-parallel size; None means the same as tp."""
    cp: int = 1
    """Context-parallel size (needs Transformer Engine attention)."""
    sequence_parallel: bool | None = None
    """None means on whenever tp > 1."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""
    overlap_grad_reduce: bool = False
    overlap_p2p_comm: bool | None = None
    """Megatron-Core's option of the same name: the interleaved schedule (`vpp`) sends and
    receives each chunk's activations / gradients asynchronously behind the next chunk's
    compute (and so stops batching p2p ops). None means on whenever `vpp` is set, as
    Megatron-Bridge's `CommOverlapConfig` does; Megatron-Core overlaps only the interleaved
    schedule, so true needs `vpp`."""
    dist_backend: str = "auto"
    """`nccl`, `gloo` or `auto` (nccl with CUDA, gloo otherwise)."""

    def __post_init__(self) -> None:
        s = "parallel"
        for name in ("tp", "pp", "ep", "cp"):
            _positive(s, name, getattr(self, name))
        if self.vpp is not None:
            _positive(s, "vpp", self.vpp)
            if self.pp == 1:
                raise ValueError("parallel.vpp needs parallel.pp > 1")
        if self.etp is not None:
            _positive(s, "etp", self.etp)
        for name in ("first_stage_layers", "last_stage_layers"):
            if getattr(self, name) is not None:
                _positive(s, name, getattr(self, name))
                if self.pp == 1:
                    raise ValueError(f"parallel.{name} needs parallel.pp > 1")
        for name in (
            "account_for_embedding_in_pipeline_split",
            "account_for_loss_in_pipeline_split",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"parallel.{name}={getattr(self, name)!r}: expected true or false")
            if getattr(self, name) and self.pp == 1:
                raise ValueError(f"parallel.{name} needs parallel.pp > 1")
        if self.accounts_in_split and (self.first_stage_layers or self.last_stage_layers):
            raise ValueError(
                "parallel.account_for_embedding/loss_in_pipeline_split cannot be combined with "
                "parallel.first_stage_layers/last_stage_layers (Megatron-Core refuses both)"
            )
        _choice(s, "dist_backend", self.dist_backend, ("auto", "nccl", "gloo"))
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tp > 1")
        if self.overlap_p2p_comm is not None:
            if not isinstance(self.overlap_p2p_comm, bool):
                raise ValueError(
                    f"parallel.overlap_p2p_comm={self.overlap_p2p_comm!r}: expected true, false "
                    "or null (on with vpp)"
                )
            if self.overlap_p2p_comm and self.vpp is None:
                raise ValueError(
                    "parallel.overlap_p2p_comm=true needs parallel.vpp: Megatron-Core overlaps "
                    "pipeline sends and receives only in the interleaved schedule"
                )

    @property
    def sp(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    @property
    def p2p_overlap(self) -> bool:
        """`overlap_p2p_comm` in effect (None: on with `vpp`)."""
        return self.vpp is not None if self.overlap_p2p_comm is None else self.overlap_p2p_comm

    @property
    def accounts_in_split(self) -> bool:
        """The embedding or the loss counts as a layer in the pipeline split."""
        return (
            self.account_for_embedding_in_pipeline_split or self.account_for_loss_in_pipeline_split
        )

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def etp_size(self) -> int:
        """Expert tensor-parallel size in effect (`etp`, or `tp` when unset)."""
        return expert_tp_size(self.tp, self.etp)

    def mcore_sizes(self) -> dict[str, int | None]:
        """This layout in Megatron-Core's keywords, as both
        `parallel_state.initialize_model_parallel` and `TransformerConfig` take them."""
        return dict(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp,
            context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.etp_size,
        )


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup and cosine (or constant/linear) decay."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    warmup_steps: int = 0
    decay_style: str = "cosine"
    decay_steps: int | None = None
    """Steps of decay after warmup ends; None means training.steps - warmup_steps."""
    grad_reduce_dtype: str = "fp32"
    """Dtype of the DDP gradient buffers and their data-parallel reduction: `fp32` (Megatron-
    Core's `grad_reduce_in_fp32`: 4 bytes per parameter) or `bf16` (the parameters' dtype, 2
    bytes; needs training.precision=bf16, an error otherwise). `kat plan` counts the same."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr={self.lr}: expected > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optimizer.min_lr={self.min_lr}: expected in [0, optimizer.lr]")
        _positive("optimizer", "warmup_steps", self.warmup_steps, allow_zero=True)
        _choice("optimizer", "decay_style", self.decay_style, ("cosine", "linear", "constant"))
        _choice("optimizer", "grad_reduce_dtype", self.grad_reduce_dtype, ("fp32", "bf16"))
        if self.clip_grad < 0:
            raise ValueError(f"optimizer.clip_grad={self.clip_grad}: expected >= 0")


@dataclass
class TrainingConfig:
    """Step budget and batch shape."""

    steps: int = 20
    """Optimizer steps; 0 builds the model, saves its initial checkpoint and exits."""
    micro_batch_size: int = 2
    global_batch_size: int = 4
    """Samples per optimizer step over all data-parallel ranks (multiple of mbs * dp)."""
    seed: int = 1234
    precision: str = "auto"
    """`bf16`, `fp16`, `fp32` or `auto` (bf16 on CUDA, fp32 on CPU)."""
    eval_interval: int = 0
    """Run validation every n steps (0 = never)."""
    eval_iters: int = 2
    recompute: str = "none"
    """Activation recomputation: `none`, `selective` (attention core, MoE activations) or
    `full` (every layer's input is kept, the layer rerun in backward); see `kat plan`."""
    exit_interval: int = 0
    """Save a checkpoint and exit after a step divisible by this (0 = run to the end)."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "global_batch_size", "eval_iters"):
            _positive("training", name, getattr(self, name))
        _positive("training", "steps", self.steps, allow_zero=True)
        _positive("training", "eval_interval", self.eval_interval, allow_zero=True)
        _positive("training", "exit_interval", self.exit_interval, allow_zero=True)
        _choice("training", "recompute", self.recompute, ("none", "selective", "full"))
        _choice("training", "precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"training.global_batch_size={self.global_batch_size} is not a multiple of "
                f"training.micro_batch_size={self.micro_batch_size}"
            )


@dataclass
class DataConfig:
    """Training data: Megatron indexed datasets, JSONL preprocessed on first use, or mock."""

    paths: list = field(default_factory=list)
    """Megatron blend: [prefix, ...] or [weight, prefix, weight, prefix, ...]."""
    jsonl: list = field(default_factory=list)
    """JSONL files ({"text": ...} per line) tokenized into `cache_dir` on first use."""
    tokenizer: str = "tiny"
    """Hugging Face tokenizer directory, or `tiny` for the tokenizer shipped with the package."""
    text_key: str = "text"
    seq_length: int = 64
    split: str = "98,2,0"
    """Train/valid/test split weights of each dataset."""
    cache_dir: str | None = None
    """Where tokenized JSONL and dataset indices go; None means `<run.dir>/data_cache`."""
    mock: bool = False
    """Use Megatron-Core's MockGPTDataset (random tokens) instead of files."""
    packing: bool | None = None
    """Stage sft: feed the packed chat rows as THD rows (`PackedSeqParams`, attention per
    document, no [s, s] mask; docs/attention.md) instead of a dense block-causal mask. None: on
    where the attention honours it (model.attention=sdpa, or Transformer Engine), off with
    model.attention=unfused (true there is an error). Stage pretrain: true attends per
    EOD-separated document with positions restarting per document (THD rows); None or false
    attend across the documents of a sample, as Megatron-LM pretrains by default. Stage kd has
    its own switch, `kd.packing`."""

    def __post_init__(self) -> None:
        _positive("data", "seq_length", self.seq_length)
        if self.packing not in (None, True, False):
            raise ValueError(f"data.packing={self.packing!r}: expected true, false or null")
        if len(self.paths) > 1 and len(self.paths) % 2:
            raise ValueError(
                "data.paths: a blend lists weight, prefix pairs; got an odd number of entries"
            )
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            raise ValueError(f"data.split={self.split!r}: expected three numbers like '98,2,0'")


@dataclass
class CheckpointConfig:
    """Megatron distributed checkpoints (torch_dist) with optimizer, scheduler, RNG, data state."""

    save_interval: int = 0
    """Save every n steps (0 = only at the end)."""
    save: bool = True
    """Save a checkpoint at the end of training."""
    dir: str | None = None
    """None means `<run.dir>/checkpoints`."""
    load: str | None = None
    """Initialise weights from this checkpoint directory (model only)."""
    resume: str = "auto"
    """`auto`: the latest complete checkpoint in `dir` if any; `none`: start fresh; or the path
    of one checkpoint directory (`.../iter_0000010`) to resume from (weights, optimizer, data)."""
    keep_last: int = 0
    """Keep only the newest n checkpoints (0 = keep all)."""

    def __post_init__(self) -> None:
        _positive("checkpoint", "save_interval", self.save_interval, allow_zero=True)
        _positive("checkpoint", "keep_last", self.keep_last, allow_zero=True)
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError(
                f"checkpoint.resume={self.resume!r}: expected auto, none or a checkpoint directory"
            )


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl (always), TensorBoard and wandb."""

    interval: int = 1
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "kat_megatron"
    wandb_run_id: str | None = None
    """Fixed wandb run id (resumed runs reuse the id stored in the run directory)."""

    def __post_init__(self) -> None:
        _positive("logging", "interval", self.interval)


@dataclass
class RunConfig:
    """Where a run writes (config, metrics.jsonl, checkpoints, logs)."""

    name: str = "kat"
    dir: str = "runs/kat"


KD_TEACHER_MODES = ("online", "offline")


@dataclass
class KDTeacherConfig:
    """`kd.teacher`: where stage kd's teacher distribution comes from (docs/mtp_kd.md)."""

    mode: str = "online"
    """`online`: a frozen Megatron-Core model run in the student's forward step (needs `ckpt`);
    `offline`: top-K log-probs written by `kat kd dump-teacher` (needs `topk_dir`)."""
    ckpt: str | None = None
    """Teacher checkpoint: a kat checkpoint directory, or a checkpoints root (its newest)."""
    preset: str | None = None
    """Teacher architecture preset; None means the model config recorded in the checkpoint."""
    model: dict = field(default_factory=dict)
    """ModelConfig fields overriding the teacher architecture (over `preset` or the checkpoint's)."""
    topk_dir: str | None = None
    """Offline: the directory written by `kat kd dump-teacher`."""

    def __post_init__(self) -> None:
        _choice("kd.teacher", "mode", self.mode, KD_TEACHER_MODES)
        if not isinstance(self.model, dict):
            raise ValueError(f"kd.teacher.model={self.model!r}: expected a mapping of model fields")


@dataclass
class KDSection:
    """MTP-KD (`stage: kd`): `kat_megatron.losses.kd.KDConfig`'s fields and the teacher."""

    alpha: float = 0.5
    """Weight of the KD term; (1 - alpha) weights cross-entropy. 0 = CE only (no teacher)."""
    temperature: float = 1.0
    """tau of the KL term (scaled by tau^2); an offline dump must be made at the same tau."""
    topk: int = 0
    """0: the full teacher distribution; K: teacher top-K plus one residual bucket (offline:
    0 or the dump's K)."""
    divergence: str = "forward_kl"
    """A registered KD loss (`kat_megatron.losses.kd.KD_LOSSES`): forward_kl or reverse_kl."""
    mtp_loss_scaling_factor: float | None = None
    """lambda: MTP depth d >= 1 is weighted lambda / D; None means
    model.mtp_loss_scaling_factor."""
    mask_document_boundaries: bool = True
    """No loss where the depth-d target x[t+1+d] is in another document than x[t] (EOD)."""
    packing: bool = False
    """Attention per EOD-separated document: each micro-batch runs as one THD row with
    `PackedSeqParams` (student and online teacher; docs/attention.md). False: attention crosses
    documents within a sample, as Megatron-LM pretrains by default (`reset_attention_mask`
    off) and as `kat kd dump-teacher` computes an offline teacher's top-K."""
    teacher: dict = field(default_factory=dict)
    """`KDTeacherConfig` fields: mode, ckpt, preset, model, topk_dir."""

    def __post_init__(self) -> None:
        # Range checks here; the divergence name is checked against the KD loss registry by
        # stage kd's check (`training/kd_stage.py: check_kd`).
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"kd.alpha={self.alpha!r}: expected a number in [0, 1]")
        if not self.temperature > 0.0:
            raise ValueError(f"kd.temperature={self.temperature!r}: expected a number > 0")
        _positive("kd", "topk", self.topk, allow_zero=True)
        lam = self.mtp_loss_scaling_factor
        if lam is not None and not lam >= 0.0:
            raise ValueError(f"kd.mtp_loss_scaling_factor={lam!r}: expected >= 0")
        self.teacher_config()

    def teacher_config(self) -> KDTeacherConfig:
        """`teacher` as a KDTeacherConfig; `model.X` keys (from the override
        kd.teacher.model.X=...) are folded into `model`."""
        import dataclasses

        if not isinstance(self.teacher, dict):
            raise ValueError(f"kd.teacher: expected a mapping, got {self.teacher!r}")
        values = {k: v for k, v in self.teacher.items() if not k.startswith("model.")}
        dotted = {k[len("model.") :]: v for k, v in self.teacher.items() if k.startswith("model.")}
        if dotted:
            values["model"] = {**(values.get("model") or {}), **dotted}
        known = [f.name for f in dataclasses.fields(KDTeacherConfig)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"kd.teacher: unknown keys {unknown}; known: {known}")
        return KDTeacherConfig(**values)


RL_SUBSECTIONS = ("sampling", "rewards", "advantages", "policy_loss", "rollout")
"""`rl.<name>` mappings: the fields of a component's dataclass, built and checked by stage rl
(`kat_megatron/rl/parts.py`)."""


@dataclass
class RLConfig:
    """Step-SRPO / GRPO (`stage: rl`, docs/rl_trainer.md). `training.steps` counts RL steps (one
    rollout batch each, trained with `ppo_epochs * mini_batches` optimizer steps, one by
    default); `optimizer` configures the policy's Adam, whose schedule advances once per RL
    step."""

    prompts: str | None = None
    """Prompt records: a JSONL file or a saved `datasets` directory with `messages`,
    `reference`, `verifier` and optionally `category` and `id` per record."""
    prompts_per_step: int = 8
    """Prompts (groups) trained on per step, over all data-parallel ranks."""
    group_size: int = 4
    """Rollouts G per prompt."""
    sampling: dict = field(default_factory=dict)
    """Rollout sampling: `kat_megatron.inference.types.SamplingParams` fields (temperature, top_p,
    top_k, max_new_tokens); stop tokens are `<|im_end|>` and `<|endoftext|>`."""
    rewards: dict = field(default_factory=dict)
    """`kat_megatron.rl.rewards.RewardConfig` fields (weights, overlong_buffer, ...);
    `max_new_tokens` defaults to `sampling.max_new_tokens`."""
    advantages: dict = field(default_factory=dict)
    """`kat_megatron.rl.advantages.AdvantageConfig` fields (estimator step_srpo|grpo,
    mode_weight, beta, delta, std_normalize, leave_one_out)."""
    policy_loss: dict = field(default_factory=dict)
    """`kat_megatron.losses.policy.PolicyLossConfig` fields (clip_low, clip_high, aggregation,
    kl_coef, kl_estimator, kl_in_reward, is_correction, entropy_coef, ...)."""
    rollout: dict = field(default_factory=dict)
    """`kat_megatron.rl.rollout_config.RolloutConfig` fields: `engine` megatron (default, the
    colocated engine) or vllm (a vLLM worker refitted in memory), `vllm_python`,
    `refit_bucket_mb` (256), `startup_timeout_s`, `vllm_args` (docs/rollout_engine.md)."""
    reference_ckpt: str | None = None
    """Frozen reference policy for the KL terms; None means `checkpoint.load` (the initial
    policy). Only loaded when policy_loss.kl_coef > 0."""
    dynamic_sampling: bool = False
    """Drop groups whose advantages are all zero (identical rewards, no mode preference) and
    refill from the next prompts (DAPO)."""
    max_refill_rounds: int = 2
    """With dynamic_sampling: at most this many extra generation rounds per step."""
    forced_probes: int = 0
    """k: when a group lacks one mode, k rollouts forced into the missing mode serve as its
    evidence for the mode reward (never trained on). 0 disables."""
    micro_batch_size: int = 8
    """Rollouts per training micro-batch (per data-parallel rank)."""
    ppo_epochs: int = 1
    """Passes over each step's rollouts (verl's ppo_epochs, TRL's num_iterations)."""
    mini_batches: int = 1
    """Optimizer steps per pass: each rank's rollouts are split, in order, into this many
    mini-batches. With ppo_epochs * mini_batches > 1 the old log-probs are the policy's own
    before the step's first update (one extra forward pass), so the PPO clip takes effect."""
    max_sequence_length: int = 512
    """Prompt + response tokens; longer prompts (with max_new_tokens) are skipped at load."""
    shuffle: bool = True
    """Visit prompts in a seeded random order (a new permutation each epoch)."""
    engine_max_batch_size: int = 64
    """Sequences the rollout engine decodes at once."""
    log_rollouts: int = 2
    """Rollouts per step written (text, rewards) to `<run.dir>/rollouts.jsonl`."""
    max_reward_error_rate: float | None = None
    """Stop the run when a step's `reward_error_rate` (rewards that failed for an internal
    reason, e.g. the code sandbox, over every rollout scored) exceeds this; None: never."""
    router_replay: bool = False
    """MoE policies: route every token in the training forwards to the experts the rollout
    engine chose when it sampled it (Megatron-Core's RouterReplay; `rl/router_replay.py`).
    Needs rl.rollout.engine=megatron and parallel.tp=1."""
    packing: bool | None = None
    """Train on each micro-batch's prompt + response rows concatenated into one THD row
    without padding (`PackedSeqParams`, verl's remove-padding; docs/attention.md) instead of
    rows right-padded to the longest. None: on where the attention honours it
    (model.attention=sdpa, or Transformer Engine), off with model.attention=unfused (true
    there is an error)."""

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "group_size", "micro_batch_size", "ppo_epochs",
                     "mini_batches", "max_sequence_length", "engine_max_batch_size"):  # fmt: skip
            _positive("rl", name, getattr(self, name))
        for name in ("max_refill_rounds", "forced_probes", "log_rollouts"):
            _positive("rl", name, getattr(self, name), allow_zero=True)
        if self.group_size < 2:
            raise ValueError(
                f"rl.group_size={self.group_size}: expected >= 2 (advantages compare the "
                "rollouts of a group)"
            )
        for name in RL_SUBSECTIONS:
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"rl.{name}: expected a mapping, got {getattr(self, name)!r}")
        rate = self.max_reward_error_rate
        if rate is not None and (isinstance(rate, bool) or not 0 <= rate <= 1):
            raise ValueError(f"rl.max_reward_error_rate={rate!r}: expected None or in [0, 1]")
        if self.packing not in (None, True, False):
            raise ValueError(f"rl.packing={self.packing!r}: expected true, false or null")


@dataclass
class KatConfig:
    """A whole run. `stage` picks the trainer; the other sections configure its parts."""

    stage: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    kd: KDSection = field(default_factory=KDSection)

    def __post_init__(self) -> None:
        check_layout(self.model, self.parallel)
        if self.optimizer.grad_reduce_dtype == "bf16" and self.training.precision in (
            "fp32",
            "fp16",
        ):
            raise ValueError(
                "optimizer.grad_reduce_dtype=bf16 needs bf16 parameters "
                f"(training.precision={self.training.precision}); use fp32"
            )
        if self.model.fp8_param and not self.parallel.use_distributed_optimizer:
            raise ValueError(
                "model.fp8_param=true needs parallel.use_distributed_optimizer=true (Megatron-"
                "Core keeps the fp32 main weights in the distributed optimizer's shards and "
                "all-gathers the FP8 bytes)"
            )
        if self.data.seq_length > self.model.max_position_embeddings:
            raise ValueError(
                f"data.seq_length={self.data.seq_length} exceeds "
                f"model.max_position_embeddings={self.model.max_position_embeddings}"
            )


def check_layout(model: ModelConfig, par: ParallelConfig, world_size: int | None = None) -> None:
    """Raise ValueError (one line, saying what to change) if `par` cannot shard `model`."""
    tp, pp, ep = par.tp, par.pp, par.ep
    if model.num_attention_heads % tp:
        raise ValueError(
            f"parallel.tp={tp} does not divide model.num_attention_heads="
            f"{model.num_attention_heads}; choose tp from {_divisors(model.num_attention_heads)}"
        )
    if model.num_query_groups % tp:
        raise ValueError(
            f"parallel.tp={tp} does not divide model.num_query_groups={model.num_query_groups} "
            f"(KV groups); choose tp from {_divisors(model.num_query_groups)}"
        )
    if model.ffn_hidden_size % tp:
        raise ValueError(
            f"parallel.tp={tp} does not divide model.ffn_hidden_size={model.ffn_hidden_size}"
        )
    pipeline_split(model.num_layers, par)
    if ep > 1 and not model.is_moe:
        raise ValueError(f"parallel.ep={ep} needs an MoE model (model.num_moe_experts is unset)")
    if model.is_moe and model.num_moe_experts % ep:
        raise ValueError(
            f"parallel.ep={ep} does not divide model.num_moe_experts={model.num_moe_experts}; "
            f"choose ep from {_divisors(model.num_moe_experts)}"
        )
    if model.is_moe and tp > 1 and not par.sp:
        raise ValueError("MoE with parallel.tp > 1 needs parallel.sequence_parallel=true")
    if world_size is not None:
        mp = par.model_parallel_size
        if world_size % mp:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp={mp} "
                f"(parallel.tp={tp}, parallel.pp={pp}, parallel.cp={par.cp}); start a multiple "
                f"of {mp} ranks (e.g. --nproc {mp}) or shrink the layout"
            )
        expert_mp = par.etp_size * ep * pp
        if world_size % expert_mp:
            raise ValueError(
                f"world size {world_size} is not divisible by etp*ep*pp={expert_mp} "
                f"(parallel.etp={par.etp_size}, parallel.ep={ep}, parallel.pp={pp}); "
                "Megatron-Core's expert groups need it"
            )


def pipeline_split(num_layers: int, par: ParallelConfig) -> list[int]:
    """Decoder layers on each pipeline rank, or ValueError (one line) for a split Megatron-Core
    0.16.1 refuses (`TransformerConfig.__post_init__`, `get_num_layers_to_build`).

    Even (no first/last given): pp * vpp divides the layers. Uneven: the first and/or last stage
    take the given counts, the stages between share the rest evenly (there must be some iff
    layers remain); with vpp every stage's count is a multiple of vpp. Each rank's layers are
    split into vpp chunks; chunk v of all ranks covers layers [v*L/vpp, (v+1)*L/vpp). With
    `account_for_embedding/loss_in_pipeline_split`: `_accounted_split`."""
    pp, vpp, first, last = par.pp, par.vpp or 1, par.first_stage_layers, par.last_stage_layers
    if par.accounts_in_split:
        return _accounted_split(num_layers, par)
    if first is None and last is None:
        if num_layers % (pp * vpp):
            what = f"parallel.pp={pp}" + (f" x parallel.vpp={par.vpp}" if par.vpp else "")
            raise ValueError(
                f"{what} does not divide model.num_layers={num_layers}; choose pp from "
                f"{_divisors(num_layers)} or set parallel.first_stage_layers/last_stage_layers"
            )
        return [num_layers // pp] * pp
    ends = {"first_stage_layers": first, "last_stage_layers": last}
    given = {k: v for k, v in ends.items() if v is not None}
    for name, n in given.items():
        if n % vpp:
            raise ValueError(f"parallel.{name}={n} is not a multiple of parallel.vpp={vpp}")
    middle, stages = num_layers - sum(given.values()), pp - len(given)
    if middle < 0 or bool(middle) != bool(stages) or (stages and middle % (stages * vpp)):
        raise ValueError(
            f"parallel.first_stage_layers={first}, last_stage_layers={last} leave {middle} of "
            f"model.num_layers={num_layers} layers for {stages} middle stage(s) of parallel.pp="
            f"{pp}; they must split evenly"
            + (f" in multiples of parallel.vpp={vpp}" if par.vpp else "")
        )
    per = middle // stages if stages else 0
    return [first or per] + [per] * (pp - 2) + [last or per]


def _accounted_split(num_layers: int, par: ParallelConfig) -> list[int]:
    """`pipeline_split` with the embedding and/or the loss counted as layers: L + 1 or L + 2
    slots split evenly over pp (and vpp); the first rank builds one layer fewer for the
    embedding, the last one fewer for the loss (Megatron-Core's `get_num_layers_to_build`)."""
    emb, loss = par.account_for_embedding_in_pipeline_split, par.account_for_loss_in_pipeline_split
    slots, vpp = num_layers + emb + loss, par.vpp or 1
    if slots % (par.pp * vpp):
        what = f"parallel.pp={par.pp}" + (f" x parallel.vpp={par.vpp}" if par.vpp else "")
        raise ValueError(
            f"{what} does not divide model.num_layers={num_layers} + {emb + loss} (the embedding "
            "and/or loss counted as layers by parallel.account_for_*_in_pipeline_split)"
        )
    split = [slots // par.pp] * par.pp
    split[0] -= emb
    split[-1] -= loss
    return split


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
