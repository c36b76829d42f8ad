"""MoE router replay for stage rl (`rl.router_replay: true`, docs/rl_trainer.md).

`kat train CFG.yaml rl.router_replay=true` (a MoE policy, `rl.rollout.engine: megatron`,
parallel.tp = 1): the experts each token was routed to while the rollout engine sampled it are
recorded and the training forwards (old/reference-free log-probs and the loss) route every
token to the same experts, through Megatron-Core 0.16.1's
`megatron.core.transformer.moe.router_replay.RouterReplay` (the model is built with
`moe_enable_routing_replay=True`, one `RouterReplay` per MoE layer; the gate's scores are still
computed, only the top-k choice is replaced, so gradients reach the router through the chosen
experts' probabilities). Without it a token whose top-k is a near-tie can go to other experts in
training than it did in sampling (kernels and batch shapes differ), a source of the rollout /
trainer log-prob mismatch that the truncated importance ratio then has to absorb.

Layouts (shapes explicit):
- recorded, per forward pass of the engine and per MoE layer: `[s_w * b, k]` (Megatron flattens
  its `[s, b, h]` hidden states s-major) for the window of s_w positions of the b rows; the
  engine keeps `[L, b, total, k]` and hands each completion its `[L, n, k]` (int16), n =
  `len(prompt) + len(generated) - 1`: the positions it fed (the last sampled token is never fed),
  exactly the training input `tokens[:n]`;
- replayed, per micro-batch: padded `[b, s]` rows -> `[s * b, k]` per layer (transposed to
  s-major); a packed THD row `[1, t]` -> `[t, k]`; padding positions route to experts 0..k-1
  (their outputs feed no loss).
Not supported (refused by the config check): the vLLM engine (it does not report its routing),
tensor parallelism > 1 (sequence parallelism splits the router's tokens), pipeline parallelism.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

ROUTING_DTYPE = torch.int16


def transformer_overrides() -> dict:
    """TransformerConfig fields of a policy whose routing can be recorded and replayed."""
    return {"moe_enable_routing_replay": True}


def num_layers() -> int:
    """MoE layers registered for replay (0: the model was built without it)."""
    return len(RouterReplay.global_router_replay_instances)


class EngineRecorder:
    """Collects the engine's routing of one static batch: `start(b, total, k)`, `add(start,
    end)` after every forward pass over positions [start, end), `routing(row, n)`."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def start(self, b: int, total: int, k: int) -> None:
        self.buf = torch.zeros(num_layers(), b, total, k, dtype=ROUTING_DTYPE)
        RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)

    def add(self, start: int, end: int) -> None:
        """Store the pass's recorded `[s_w * b, k]` per layer at positions [start, end)."""
        b = self.buf.shape[1]
        for layer, rec in enumerate(RouterReplay.get_recorded_data()):
            if rec is None:
                raise RuntimeError("router replay: a MoE layer recorded nothing in this pass")
            self.buf[layer, :, start:end] = rec.view(end - start, b, -1).transpose(0, 1).cpu()

    def routing(self, row: int, n: int) -> torch.Tensor:
        """`[L, n, k]` of `row`'s first n positions."""
        return self.buf[:, row, :n].clone()

    def stop(self) -> None:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()


def collate(routings: list[torch.Tensor | None], length: int) -> torch.Tensor:
    """`[L, b, length, k]` of a micro-batch's rows (None: an all-padding row; at least one is
    not); positions past a row's routing route to experts 0..k-1."""
    layers, _, k = next(r for r in routings if r is not None).shape
    out = torch.arange(k, dtype=ROUTING_DTYPE).expand(layers, len(routings), length, k).clone()
    for i, r in enumerate(routings):
        if r is not None:
            out[:, i, : r.shape[1]] = r
    return out


def pack(routing_lbsk: torch.Tensor, valid_bs: torch.Tensor, t: int) -> torch.Tensor:
    """`[L, 1, t, k]`: the valid positions of a padded micro-batch's routing, concatenated in
    row order as `batching.pack_rollouts` concatenates tokens, padded to the THD row's t."""
    layers, _, _, k = routing_lbsk.shape
    out = torch.arange(k, dtype=ROUTING_DTYPE).expand(layers, 1, t, k).clone()
    flat = routing_lbsk[:, valid_bs]  # [L, n, k]
    out[:, 0, : flat.shape[1]] = flat
    return out


@contextmanager
def replaying(batch: dict) -> Iterator[None]:
    """Route the forward passes inside to `batch["routing"]` (`[L, b, s, k]`); no-op without
    it."""
    routing = batch.get("routing")
    if routing is None:
        yield
        return
    if routing.shape[0] != num_layers():
        raise RuntimeError(
            f"router replay: the batch has routing for {routing.shape[0]} MoE layers, the "
            f"model registers {num_layers()}"
        )
    device = batch["tokens"].device
    per_layer = [
        r.transpose(0, 1).reshape(-1, r.shape[-1]).to(device=device, dtype=torch.long)
        for r in routing
    ]  # [s * b, k], s-major as Megatron flattens [s, b, h]
    RouterReplay.set_replay_data(per_layer)
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        yield
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()
