"""`kat serve` as a real subprocess on loopback (TP=2, two gloo ranks): `pytest tests/inference/test_server.py`.

The server is queried with httpx and with the data pipelines' `LLMClient`; answers are checked
against this process's own TP=1 model of the same checkpoint (a full forward, no KV cache).
Tolerance for log-probs: 1e-4 (TP=2 vs TP=1 differ by fp32 summation order, ~1e-6 measured).
The last test stops the server with SIGTERM and expects exit code 0 and no rank left behind.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch

from kat_megatron.data.autothink import strip_reasoning
from kat_megatron.data.chat_template import render_chat
from kat_megatron.data.llm_client import LLMClient, LLMClientConfig

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
import engine_worker as W  # noqa: E402

pytestmark = pytest.mark.timeout(600)
MESSAGES = [{"role": "user", "content": "What is 12 plus 7?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return W.train_checkpoint(tmp_path_factory.mktemp("serve_ckpt"), steps=0)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """`kat serve --nproc 2` on a free port; yields (process, base URL, ready file)."""
    d = tmp_path_factory.mktemp("serve")
    proc, url = W.start_server(["--ckpt", str(ckpt), "--nproc", "2", "--max-sequence-length",
                                "192", "--max-batch-size", "8", "--model-name", "kat,any"], d)  # fmt: skip
    yield proc, url, d / "ready.txt", d
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def reference(ckpt):
    """The same checkpoint at TP=1 in this process (its process group is destroyed after the
    module, so later tests can initialise their own)."""
    from kat_megatron.inference.loading import engine_from_checkpoint
    from kat_megatron.parallel.init import shutdown

    engine, tok, _ = engine_from_checkpoint(ckpt, tp=1, max_sequence_length=192)
    yield engine
    shutdown()


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def test_health_and_models(server):
    _, url, _, d = server
    assert httpx.get(url.removesuffix("/v1") + "/health").json() == {"status": "ok"}
    models = httpx.get(url + "/models").json()
    assert models["data"][0]["max_model_len"] == 192
    assert f"listening on {url}" in (d / "out.log").read_text()


def test_completions_greedy_with_logprobs_match_full_forward(server, reference):
    from kat_megatron.models.forward import forward_logits

    _, url, _, _ = server
    prompt = "We know that 12 plus 7 equals"
    body = {"model": "any", "prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 1,
            "return_token_ids": True}  # fmt: skip
    r = _post(url, "/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["text_offset"]) == len(lp["tokens"])
    # The returned tokens re-scored at TP=1 by one full forward.
    prompt_ids = reference.encode(prompt)
    ids = choice["token_ids"]
    assert [reference.tokenizer.decode([i]) for i in ids] == lp["tokens"]
    if choice["finish_reason"] == "length":
        assert len(ids) == 10
    seq = torch.tensor([prompt_ids + ids])
    logp = torch.log_softmax(forward_logits([reference.model], seq)[0].float(), -1)
    steps = logp[len(prompt_ids) - 1 : -1]
    got = torch.tensor(lp["token_logprobs"])
    ref = steps.gather(1, torch.tensor(ids)[:, None])[:, 0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # greedy: each token is the argmax up to the same tolerance
    assert (steps.max(-1).values - ref).max() <= 1e-4


def test_chat_through_llmclient_equals_raw_completion(server):
    _, url, _, _ = server
    params = {"temperature": 0.7, "max_tokens": 12, "seed": 5}
    with LLMClient(LLMClientConfig(base_url=url, max_retries=0, api_key_env=None)) as client:
        chat = client.chat("kat", MESSAGES, **params)
        raw = client.complete(
            "kat", render_chat(MESSAGES, add_generation_prompt=True), stop=["<|im_end|>"], **params
        )
    direct = _post(url, "/chat/completions", {"messages": MESSAGES, **params}).json()
    content = direct["choices"][0]["message"]["content"]
    assert (chat.reasoning, chat.text) == strip_reasoning(content)
    assert raw.text == content  # the chat reply is the continuation of the rendered prompt


def test_n_seed_and_concurrent_batching(server):
    _, url, _, _ = server
    body = {"prompt": "The big horse", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9}
    many = _post(url, "/completions", {**body, "n": 3, "seed": 9}).json()["choices"]
    texts = [c["text"] for c in many]
    assert len(set(texts)) > 1
    one = _post(url, "/completions", {**body, "seed": 9}).json()["choices"][0]["text"]
    assert one == texts[0]  # sample j of seed s does not depend on n
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        r = _post(url, "/completions", {**body, "seed": 9, "n": 3})
        results[i] = [c["text"] for c in r.json()["choices"]]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == texts for i in range(3))  # however requests were batched


def test_bad_requests(server):
    _, url, _, _ = server
    assert _post(url, "/completions", {"prompt": "x", "max_tokens": 0}).status_code == 400
    assert _post(url, "/completions", {"prompt": "x", "echo": True}).status_code == 400
    assert _post(url, "/chat/completions", {"messages": [{"role": "bot"}]}).status_code == 400
    long = _post(url, "/completions", {"prompt": [5] * 192})
    assert long.status_code == 400 and "prompt" in long.json()["error"]["message"]
    assert _post(url, "/nothing", {}).status_code == 404
    r = httpx.post(url + "/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400


def test_sigterm_stops_cleanly(server):
    proc, url, ready, d = server
    import psutil

    ranks = psutil.Process(proc.pid).children(recursive=True)
    assert len([p for p in ranks if "kat_megatron.cli" in " ".join(p.cmdline())]) >= 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, (d / "err.log").read_text()[-3000:]
    assert not ready.exists()
    assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/models", timeout=5)
