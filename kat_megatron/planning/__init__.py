"""Scale planning: `kat plan CONFIG|PRESET --gpus N --gpu-mem-gb 80 [--seq-len S] [--top K]`.

`layout` enumerates and validates TP x PP x VPP x EP x ETP x CP x DP layouts; `inventory` lists
the parameters each pipeline rank holds; `static` reproduces Megatron-Core's DDP-buffer and
(distributed) optimizer allocations; `activations` counts what a forward pass saves per
micro-batch and pipeline stage; `cost` gives FLOPs, bubble and communication per step; `planner`
and `report` combine them for `kat plan`; `runtime` logs the estimate beside the measured bytes
at the start of `kat train`. Formulas and sources: docs/scaling.md.
"""

from kat_megatron.planning.layout import Batch, Cluster, Layout, check_layout, enumerate_layouts
from kat_megatron.planning.planner import PlanOptions, evaluate, plan

__all__ = [
    "Batch",
    "Cluster",
    "Layout",
    "PlanOptions",
    "check_layout",
    "enumerate_layouts",
    "evaluate",
    "plan",
]
