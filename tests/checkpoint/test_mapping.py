"""Tensor mapping, safetensors I/O, up-scaling plans and clear errors (one process, no ranks):
`pytest tests/checkpoint/test_mapping.py`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kat_megatron.checkpoint.hf_config import HFSpec, hf_spec_for
from kat_megatron.checkpoint.hf_io import HFReader, ShardedWriter, atomic_dir
from kat_megatron.checkpoint.mapping import canonical_shapes, from_hf, qkv_from_hf, to_hf
from kat_megatron.checkpoint.sources import HFSource
from kat_megatron.checkpoint.upscale import layer_plan, upscale_depth
from kat_megatron.cli import main
from kat_megatron.config.schema import ModelConfig

GQA = ModelConfig(preset=None, hidden_size=64, num_attention_heads=8, num_query_groups=2)


def test_qkv_is_interleaved_per_kv_group():
    """Megatron's fused QKV: per group, its query heads, then its key head, then its value head."""
    d, per, ng, h = GQA.head_dim, 4, 2, GQA.hidden_size
    q, k, v = torch.randn(ng * per * d, h), torch.randn(ng * d, h), torch.randn(ng * d, h)
    fused = qkv_from_hf(q, k, v, GQA)
    expected = []
    for g in range(ng):
        expected += [
            q[g * per * d : (g + 1) * per * d],
            k[g * d : (g + 1) * d],
            v[g * d : (g + 1) * d],
        ]
    assert torch.equal(fused, torch.cat(expected))
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    back = dict(to_hf(name, fused, GQA, HFSpec("Qwen2ForCausalLM", True, False)))
    assert torch.equal(back["model.layers.0.self_attn.k_proj.weight"], k)


def test_qwen3_moe_attention_bias_exports_a_zero_o_proj_bias():
    model = ModelConfig(preset=None, num_moe_experts=4, qk_layernorm=True, add_qkv_bias=True)
    spec = hf_spec_for(model)
    assert spec.o_bias
    name = "decoder.layers.0.self_attention.linear_proj.weight"
    out = dict(to_hf(name, torch.randn(64, 64), model, spec))
    assert not out["model.layers.0.self_attn.o_proj.bias"].any()
    assert torch.equal(from_hf(name, out.__getitem__, model, spec), out[next(iter(out))])
    out["model.layers.0.self_attn.o_proj.bias"][0] = 1.0
    with pytest.raises(ValueError, match="o_proj.bias is non-zero"):
        from_hf(name, out.__getitem__, model, spec)


def test_export_refuses_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match="qk_layernorm=true"):
        hf_spec_for(ModelConfig(preset=None, num_moe_experts=4))  # our MoE preset style
    with pytest.raises(ValueError, match="no shared expert"):
        hf_spec_for(
            ModelConfig(
                preset=None,
                num_moe_experts=4,
                qk_layernorm=True,
                moe_shared_expert_intermediate_size=64,
            )
        )
    with pytest.raises(ValueError, match="dense without qk-norm"):
        hf_spec_for(ModelConfig(preset=None, qk_layernorm=True), "Qwen2ForCausalLM")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_writer_streams_a_plan_readable_by_safetensors(tmp_path, dtype):
    from safetensors.torch import load_file

    tensors = {f"t{i}": torch.randn(5 + i, 3).to(dtype) for i in range(5)}
    plan = [(k, tuple(t.shape), dtype) for k, t in tensors.items()]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=16 * dtype.itemsize)
    with pytest.raises(ValueError, match="plan expects t0"):
        writer.write("t1", tensors["t1"])
    for k, t in tensors.items():
        writer.write(k, t)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 5
    loaded = {}
    for f in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / f))
    reader = HFReader(tmp_path)
    for k, t in tensors.items():
        assert torch.equal(loaded[k], t) and torch.equal(reader.get(k), t)
    assert torch.equal(reader.get("t3", row=2), tensors["t3"][2])


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.safetensors").write_text("x")
            raise RuntimeError("killed mid-write")
    assert not out.exists() and not (tmp_path / "out.tmp").exists()
    with atomic_dir(out):
        pass
    with pytest.raises(ValueError, match="exists; remove it or pass --overwrite"):
        with atomic_dir(out):
            pass


def test_unsupported_architecture_is_one_line(hf_models, tmp_path, capsys):
    bad = tmp_path / "llama"
    shutil.copytree(hf_models["dense_a"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, architectures=["LlamaForCausalLM"])))
    assert main(["convert", "hf-to-mcore", "--hf", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unsupported architecture ['LlamaForCausalLM']" in capsys.readouterr().err


def test_missing_shard_is_named(hf_models, tmp_path):
    bad = tmp_path / "partial"
    shutil.copytree(hf_models["dense_a"], bad)
    (bad / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00004.safetensors"):
        HFSource(bad)


def test_shape_mismatch_names_the_tensor(hf_models, tmp_path):
    bad = tmp_path / "wrong"
    shutil.copytree(hf_models["dense_a"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=128)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight: shape \[96"):
        HFSource(bad).check()


def test_layout_that_does_not_divide_fails_before_starting_ranks(hf_models, tmp_path, capsys):
    args = ["convert", "hf-to-mcore", "--hf", str(hf_models["dense_a"]), "--out", str(tmp_path)]
    assert main([*args, "--tp", "3", "--overwrite"]) == 2
    assert "parallel.tp=3 does not divide model.num_attention_heads=4" in capsys.readouterr().err
    assert main([*args, "--pp", "3", "--overwrite"]) == 2
    assert "parallel.pp=3 does not divide model.num_layers=4" in capsys.readouterr().err


def test_fused_expert_tensors_are_read_like_per_expert_ones(hf_models, tmp_path):
    """transformers v5 holds experts as 3D gate_up_proj/down_proj; both layouts import alike."""
    src = HFReader(hf_models["moe"])
    fused = tmp_path / "fused"
    shutil.copytree(hf_models["moe"], fused, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = {}
    for key in src.keys():
        if ".mlp.experts." not in key:
            tensors[key] = src.get(key)
    for i in (1, 2):
        p = f"model.layers.{i}.mlp.experts"
        tensors[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([src.get(f"{p}.{e}.gate_proj.weight"), src.get(f"{p}.{e}.up_proj.weight")])
             for e in range(4)]
        )  # fmt: skip
        tensors[f"{p}.down_proj"] = torch.stack(
            [src.get(f"{p}.{e}.down_proj.weight") for e in range(4)]
        )
    writer = ShardedWriter(fused, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()])
    for k, t in tensors.items():
        writer.write(k, t)
    writer.close()
    a, b = HFSource(hf_models["moe"]), HFSource(fused)
    b.check()
    for name in canonical_shapes(a.model):
        assert torch.equal(a.get(name), b.get(name)), name


def test_layer_plans():
    plan = layer_plan(64, 80, "stack")
    assert [s for s, _ in plan] == list(range(40)) + list(range(24, 64))
    plan = layer_plan(64, 80, "interleave-identity")
    assert len(plan) == 80 and sum(z for _, z in plan) == 16
    assert [s for s, z in plan if z] == list(range(3, 64, 4))
    with pytest.raises(ValueError, match="at most 128"):
        layer_plan(64, 130, "stack")
    with pytest.raises(ValueError, match="unknown scheme"):
        layer_plan(64, 80, "random")


def test_identity_upscaling_keeps_transformers_logits(hf_models, tmp_path):
    """LLaMA-Pro style copies (zero o_proj/down_proj) leave the function unchanged: 4 -> 6."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "up"
    upscale_depth(hf_models["dense_a"], out, layers=6, scheme="interleave-identity")
    tokens = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = []
    for path in (hf_models["dense_a"], out):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(input_ids=tokens).logits)
    assert model.config.num_hidden_layers == 6
    # the copies add exact zeros to the residual stream: identical up to fp32 round-off
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-6
