"""The refit gather at pipeline, virtual-pipeline and expert parallelism against the exporter:
`pytest tests/inference/test_weight_sync_layouts.py`.

One launch of `weight_sync_worker.py` on four gloo ranks runs every layout of its `LAYOUTS`
(TP2 x PP2; PP2 with an uneven 1 + 3 split and tied embeddings; PP2 x VPP2; PP2 with an MTP
depth; EP2; TP2 x EP2 with the experts split over expert-TP too; EP2 x PP2), each from a randomly initialised tiny model that
it also saves as a kat checkpoint. The reference is independent of the gather: that checkpoint
read back from disk (`McoreReader`) and mapped with `kat convert mcore-to-hf`'s `to_hf`. Compared
exactly (`torch.equal`): both sides are copies of the same values, no arithmetic.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import weight_sync_worker as W  # noqa: E402

pytestmark = pytest.mark.timeout(600)
NPROC = 4


@pytest.fixture(scope="module")
def gathered(tmp_path_factory, run_ranks) -> Path:
    out = tmp_path_factory.mktemp("weight_sync_layouts")
    run_ranks([W.__file__, out], nproc=NPROC, timeout=400)
    return out


def _reference(ckpt: Path) -> dict[str, torch.Tensor]:
    from kat_megatron.checkpoint.hf_config import hf_spec_for
    from kat_megatron.checkpoint.mapping import is_mtp, to_hf
    from kat_megatron.checkpoint.mcore_io import McoreReader

    reader = McoreReader(ckpt)
    spec = hf_spec_for(reader.model)
    names = [n for n in reader.names() if not is_mtp(n)]  # the rollout engine serves no MTP
    return {k: t for n in names for k, t in to_hf(n, reader.get(n), reader.model, spec)}


@pytest.mark.parametrize("layout", list(W.LAYOUTS))
def test_owner_gathers_the_exported_checkpoint(gathered, layout):
    d = gathered / layout
    ref = _reference(d / "ckpt")
    ranks = [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(NPROC)]
    owners = [r for r in ranks if r["owner"]]
    # one owner per data-parallel replica: pipeline rank 0 and tensor rank 0
    assert [r["owner"] for r in ranks] == [r["tp_rank"] == 0 and r["pp_rank"] == 0 for r in ranks]
    _, parallel = W.LAYOUTS[layout]
    assert len(owners) == NPROC // (parallel.get("tp", 1) * parallel.get("pp", 1))
    order = owners[0]["names"]
    for res in owners:
        got = res["tensors"]
        assert len(res["names"]) == len(ref)  # every tensor once: no duplicate, none missing
        assert got.keys() == ref.keys()
        for key in ref:
            assert torch.equal(got[key], ref[key]), key
        assert res["names"] == order  # the same sequence on every rank
    for res in ranks:  # non-owners: tensor rank 0 yields everything, others their own stage
        if res["tp_rank"] == 0:
            assert res["names"] == order
        else:
            assert res["names"] and res["names"] == [k for k in order if k in set(res["names"])]
