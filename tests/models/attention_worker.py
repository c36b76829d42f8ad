"""SDPA vs unfused attention at one layout, for tests/models/test_attention.py (gloo ranks):

    python -m torch.distributed.run --nproc-per-node 2 tests/models/attention_worker.py OUT_DIR

TP = the world size (sequence parallelism on at TP=2, as `kat train` sets it). For every case a
model is built twice from the same weights, `model.attention=sdpa` and `model.attention=unfused`,
and one fp32 forward + backward of the same batch runs through each; OUT_DIR/rank{R}.pt gets, per
case, the relative differences of logits, loss and gradients (max |a - b| / max |b| per tensor,
the max over tensors and TP ranks) and, for the decode case, both engines' greedy completions.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch

SEQ = 32
BATCH = 2
CASES = {  # name -> (preset, ModelConfig overrides)
    "dense": ("tiny-dense", {}),
    "gqa": ("tiny-dense", {"num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 16}),
    "moe": ("tiny-moe", {}),
}
PROMPTS = [[11, 42, 7, 99, 5, 23, 301, 8], [17, 4, 250, 66], [3, 9, 27, 81, 243, 129]]
MAX_NEW = 12
INIT_STD = 0.2
"""Decode case: larger initial weights than the presets' 0.02, so that the random model's greedy
steps are not near-ties (the test checks the margins)."""


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


def build_pair(model_cfg, parallel, **overrides):
    """(sdpa model, unfused model) with identical weights."""
    from kat_megatron.models.builder import build_model, transformer_config

    models = []
    for attention in ("sdpa", "unfused"):
        cfg = dataclasses.replace(model_cfg, attention=attention)
        tcfg = transformer_config(cfg, parallel, "fp32", calculate_per_token_loss=True,
                                  **overrides)  # fmt: skip
        models.append(build_model(cfg, parallel, "fp32", config=tcfg)[0])
    models[1].load_state_dict(models[0].state_dict())
    return models


def run(model, tokens, mask=None, packed=None, loss_mask=None):
    """(logits [b, s, V/tp], loss, {name: grad}) of one forward + backward."""
    model.zero_grad()
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    labels = torch.roll(tokens, -1, dims=1)
    with torch.no_grad():
        logits = model(tokens, pos, mask, packed_seq_params=packed)
    per_token = model(tokens, pos, mask, labels=labels, packed_seq_params=packed)
    lm = torch.ones_like(per_token) if loss_mask is None else loss_mask
    loss = (per_token * lm).sum() / lm.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


def compare(pair, *args, **kw) -> dict:
    (la, lossa, ga), (lb, lossb, gb) = (run(m, *args, **kw) for m in pair)
    assert ga.keys() == gb.keys() and ga
    return {
        "logits": rel(la, lb),
        "loss": rel(lossa, lossb),
        "grads": max(rel(ga[n], gb[n]) for n in ga),
    }


def padding_mask(tokens: torch.Tensor, pad: list[int]) -> torch.Tensor:
    """[b, 1, s, s] True = masked: causal, and row b's first pad[b] positions are left padding
    (no query attends to them; the padding queries themselves are masked everywhere)."""
    b, s = tokens.shape
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    keep = torch.arange(s)[None, :] >= torch.tensor(pad)[:, None]  # [b, s] real keys
    return ~(causal[None] & keep[:, None, :])[:, None]


def packed_case(model_cfg, parallel, tp: int) -> dict:
    """Two documents in one packed row (PackedSeqParams, thd) through SDPA vs each document run
    alone through unfused attention, and vs unfused with SFT's dense block-diagonal mask."""
    from megatron.core.packed_seq_params import PackedSeqParams

    sdpa, unfused = build_pair(model_cfg, parallel)
    g = torch.Generator().manual_seed(5)
    lens = [12, SEQ - 12]
    docs = [torch.randint(5, model_cfg.vocab_size, (1, n), generator=g) for n in lens]
    row = torch.cat(docs, dim=1)
    cu = torch.tensor([0, lens[0], SEQ], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lens), max_seqlen_kv=max(lens))  # fmt: skip
    seg = torch.repeat_interleave(torch.arange(2), torch.tensor(lens))
    block = ~((seg[:, None] == seg[None, :]) & torch.ones(SEQ, SEQ, dtype=torch.bool).tril())
    block = block[None, None]
    with torch.no_grad():
        pos = torch.cat([torch.arange(n) for n in lens])[None]
        got = sdpa(row, pos, None, packed_seq_params=packed)
        dense_mask = unfused(row, pos, block)
        # each document alone (sequence parallelism splits the sequence: pad to a multiple of tp)
        alone = []
        for d in docs:
            n = d.shape[1]
            padded = torch.cat([d, torch.zeros(1, -n % tp, dtype=d.dtype)], dim=1)
            alone.append(unfused(padded, torch.arange(padded.shape[1])[None], None)[:, :n])
        alone = torch.cat(alone, dim=1)
    out = {"vs_alone": rel(got, alone), "vs_dense_mask": rel(got, dense_mask)}
    # and gradients: SDPA packed vs unfused with the block-diagonal mask
    res = {"packed": out}
    a = run(sdpa, row, packed=packed)
    b = run(unfused, row, mask=block)
    out.update(loss=rel(a[1], b[1]), grads=max(rel(a[2][n], b[2][n]) for n in a[2]))
    return res


def decode_case(model_cfg, parallel) -> dict:
    """Greedy generations of the rollout engine (KV cache, sq=1 decode steps, prompts of three
    lengths) with SDPA and with unfused attention; the greedy margins of the SDPA run."""
    from kat_megatron.data.tokenizer import load_tokenizer
    from kat_megatron.inference.engine import RolloutEngine
    from kat_megatron.inference.types import SamplingParams

    cfg = dataclasses.replace(model_cfg, init_method_std=INIT_STD)
    tok = load_tokenizer("tiny")
    out = {}
    for name, model in zip(("sdpa", "unfused"), build_pair(cfg, parallel)):
        engine = RolloutEngine(model, tok, max_sequence_length=64, max_batch_size=4)
        done = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=MAX_NEW))
        out[name] = [(c.token_ids, c.logprobs) for c in done]
        if name == "sdpa":
            from kat_megatron.models.forward import forward_logits

            margins = []
            for c in done:
                seq = c.prompt_ids + c.token_ids
                seq = seq + [0] * (-len(seq) % parallel.tp)
                logits = forward_logits([model], torch.tensor([seq]))[0]
                top2 = logits[len(c.prompt_ids) - 1 : len(c.prompt_ids) + MAX_NEW - 1]
                top2 = top2[:, : engine.vocab_size].topk(2, dim=-1).values
                margins.append((top2[:, 0] - top2[:, 1]).min().item())
            out["min_margin"] = min(margins)
    return {"decode": out}


def main(out_dir: str) -> None:
    import torch.distributed as dist

    from kat_megatron.config.presets import get_preset
    from kat_megatron.config.schema import ModelConfig, ParallelConfig
    from kat_megatron.parallel.init import initialize, set_seed, shutdown

    tp = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = ParallelConfig(tp=tp)
    dense = ModelConfig(**get_preset("tiny-dense"))
    initialize(parallel, 1234, dense)
    res: dict = {"tp": tp, "sp": parallel.sp}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, dense.vocab_size, (BATCH, SEQ), generator=g)
    for name, (preset, overrides) in CASES.items():
        set_seed(1234)
        cfg = ModelConfig(**{**get_preset(preset), **overrides})
        pair = build_pair(cfg, parallel)
        res[name] = compare(pair, tokens)
        if name == "dense":  # left padding: row 0's first 5 queries have no key at all
            mask = padding_mask(tokens, [5, 0])
            loss_mask = (~mask[:, 0].all(-1)).float()  # no loss on the padding positions
            res["padding"] = compare(pair, tokens, mask=mask, loss_mask=loss_mask)
    # selective recompute of the core attention (Megatron-Core's `core_attn`)
    set_seed(1234)
    recompute = {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    sdpa_rc, unfused = build_pair(dense, parallel, **recompute)
    res["recompute"] = compare((sdpa_rc, unfused), tokens)
    attn = sdpa_rc.decoder.layers[0].self_attention
    res["recompute"]["checkpointed"] = attn.checkpoint_core_attention and attn.training
    set_seed(1234)
    res.update(packed_case(dense, parallel, tp))
    set_seed(1234)
    res.update(decode_case(dense, parallel))
    for case in res.values():  # the worst rank decides
        if isinstance(case, dict):
            for key, value in case.items():
                if isinstance(value, float) and key != "min_margin":
                    t = torch.tensor([value], dtype=torch.float64)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    case[key] = t.item()
    torch.save(res, Path(out_dir) / f"rank{dist.get_rank()}.pt")
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
