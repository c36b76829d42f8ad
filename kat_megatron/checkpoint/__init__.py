"""Checkpoint conversion: `kat convert hf-to-mcore|mcore-to-hf|reshard|verify|upscale-depth|...`.

Every conversion moves *canonical tensors*: one full (unsharded) tensor per Megatron parameter,
named as the local layer spec names it with global layer and expert indices
(`decoder.layers.7.self_attention.linear_qkv.weight`,
`decoder.layers.7.mlp.experts.local_experts.3.linear_fc1.weight`), in Megatron's layout
(QKV interleaved per KV group, SwiGLU fc1 = [gate; up]) and without vocabulary padding.

- `mapping`: canonical tensors <-> Hugging Face tensors (Qwen2, Qwen3-MoE).
- `hf_config`: config.json <-> `ModelConfig`.
- `hf_io`: streaming safetensors reader and planned, streaming sharded writer.
- `mcore_io`: reads one canonical tensor at a time out of a torch_dist checkpoint.
- `sources`: where canonical tensors come from (HF folder, Megatron checkpoint, up-cycling).
- `stream_writer`: writes a torch_dist checkpoint from one process, one tensor at a time.
- `importer`: runs a conversion into a kat checkpoint, streaming or (`--ranks`) by filling our
  model built at the TP/PP/EP layout on its ranks.
- `exporter`: Megatron checkpoint -> Hugging Face folder (one process, streaming).
- `upscale`: depth up-scaling of a Hugging Face folder; `upcycle`: dense -> MoE.
- `verify`: logits of transformers vs ours at given layouts.

Modules that need Megatron-Core (`importer`, `stream_writer`, `verify`) are imported only where
used; the export path (`exporter`, `mcore_io`, `hf_io`) runs without it.
"""
