"""Tokenizers: the packaged `tiny` byte-level BPE, HF loading, and a Megatron-Core adapter.

`tiny` is a 512-token byte-level BPE trained offline on `synthetic_documents()` (regenerate with
`python tools/build_tiny_tokenizer.py`); it ships in `kat_megatron/assets/tiny_tokenizer/`.
Any other name is a Hugging Face tokenizer directory. `MegatronTokenizerAdapter` wraps a HF
tokenizer into the object Megatron-Core's `GPTDatasetConfig.tokenizer` expects.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

from megatron.core.tokenizers import MegatronTokenizerBase

EOS_TOKEN = "<|endoftext|>"
"""End of document (Megatron's `eod`), also the HF pad token."""
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
AUTOTHINK_TOKENS = (
    "<judge>",
    "</judge>",
    "<think_on>",
    "<think_off>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
)
SPECIAL_TOKENS = (EOS_TOKEN, *CHAT_TOKENS, *AUTOTHINK_TOKENS)
"""Special tokens of the tiny tokenizer, ids 0..10 in this order."""
TINY_VOCAB_SIZE = 512
TINY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"

_NOUNS = (
    "cat dog bird fish horse child teacher farmer robot river tree house garden city ship".split()
)
_ADJS = "big small red blue green old young quick slow happy quiet bright dark warm cold".split()
_VERBS = "sees likes finds helps follows watches carries paints builds visits counts".split()
_PLACES = "the park|the market|the school|the forest|the hill|the lake|the farm|the town".split("|")
_OPS = (("+", "plus"), ("-", "minus"), ("*", "times"))


def _arith(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    sym, word = rng.choice(_OPS)
    value = a + b if sym == "+" else a - b if sym == "-" else a * b
    form = rng.randint(0, 2)
    if form == 0:
        return f"{a} {sym} {b} = {value}."
    if form == 1:
        return f"What is {a} {word} {b}? The answer is {value}."
    return f"We know that {a} {word} {b} equals {value}."


def _sentence(rng: random.Random) -> str:
    form = rng.randint(0, 2)
    subj = f"The {rng.choice(_ADJS)} {rng.choice(_NOUNS)}"
    if form == 0:
        return f"{subj} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}."
    if form == 1:
        return f"{subj} walks to {rng.choice(_PLACES)} in the morning."
    return f"{subj} is {rng.choice(_ADJS)} and {rng.choice(_ADJS)} today."


def synthetic_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Return `n_docs` short deterministic English/arithmetic documents (1-3 sentences each)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        n = rng.randint(1, 3)
        docs.append(
            " ".join(_arith(rng) if rng.random() < 0.4 else _sentence(rng) for _ in range(n))
        )
    return docs


def build_tiny_tokenizer(output_dir: str | Path, n_docs: int = 4000, seed: int = 1234) -> Path:
    """Train the tiny byte-level BPE on `synthetic_documents` and save it as a HF directory.

    Writes tokenizer.json, tokenizer_config.json (with the AutoThink chat template) and
    special_tokens_map.json; the result is byte-identical from run to run (the trainer and the
    corpus are deterministic).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from kat_megatron.data.chat_template import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_documents(n_docs, seed), trainer=trainer)
    if tok.get_vocab_size() != TINY_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} tokens, not 512")
    special = {
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
    }
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=32768, **special)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    # Name a class every transformers version knows (v5 writes its own `TokenizersBackend`).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE  # AutoThink, see kat_megatron/data/chat_template.py
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # transformers v5 no longer writes special_tokens_map.json; older versions read it.
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def resolve_tokenizer_path(name_or_path: str) -> str:
    """Map `tiny` to the packaged tokenizer directory; return anything else unchanged."""
    return str(TINY_TOKENIZER_DIR) if name_or_path == "tiny" else str(name_or_path)


def load_tokenizer(name_or_path: str) -> Any:
    """Load a Hugging Face tokenizer: `tiny` (packaged) or a tokenizer directory.

    A name that is not a directory is passed on to `AutoTokenizer` (works for models already in
    the local HF cache). Raises FileNotFoundError / ValueError with the name on failure.
    """
    from transformers import AutoTokenizer

    path = resolve_tokenizer_path(name_or_path)
    if name_or_path == "tiny" and not (TINY_TOKENIZER_DIR / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"packaged tiny tokenizer missing at {TINY_TOKENIZER_DIR}; "
            "run `python tools/build_tiny_tokenizer.py`"
        )
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"tokenizer {name_or_path!r}: expected a directory, got a file")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises many types (OSError, ValueError, HTTP errors)
        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"tokenizer {name_or_path!r}: not a directory and not loadable by AutoTokenizer "
                f"({err})"
            ) from err
        raise ValueError(f"tokenizer {name_or_path!r}: failed to load: {err}") from err


def add_special_tokens(tokenizer: Any, tokens: list[str] | tuple[str, ...]) -> int:
    """Add `tokens` as additional special tokens (keeping existing ones); return how many are new.

    Tokens already in the vocabulary keep their ids. Remember to resize the model's embedding
    when this returns > 0.
    """
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if not new:
        return 0
    spec = {"additional_special_tokens": new}
    try:
        return tokenizer.add_special_tokens(spec, replace_extra_special_tokens=False)
    except TypeError:  # transformers < 5
        return tokenizer.add_special_tokens(spec, replace_additional_special_tokens=False)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without BOS/EOS or any template (special tokens in text are kept)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast path, no max-length warnings
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A sha256 hex digest that changes whenever the tokenizer would encode differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class MegatronTokenizerAdapter(MegatronTokenizerBase):
    """A HF tokenizer seen as a Megatron-Core tokenizer (`GPTDatasetConfig.tokenizer`).

    GPTDataset uses `eod` (document separator), `vocab_size` (index dtype), `pad` (falls back to
    Megatron's -1 sentinel when pad and eod coincide) and `unique_identifiers` (part of the hash
    that keys Megatron's cached sample indices).
    """

    def __init__(self, hf_tokenizer: Any, name: str | None = None) -> None:
        name = name or getattr(hf_tokenizer, "name_or_path", "") or "unnamed"
        super().__init__(str(name), {})
        self.hf_tokenizer = hf_tokenizer
        self.name = str(name)
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {name!r} has no eos token; Megatron needs one as eod")
        self._eod = int(eos)
        self.fingerprint = tokenizer_fingerprint(hf_tokenizer)
        self.unique_identifiers = OrderedDict(
            [
                ("class", type(self).__name__),
                ("tokenizer_path", self.name),
                ("vocab_size", self.vocab_size),
                ("fingerprint", self.fingerprint),
            ]
        )

    @classmethod
    def from_name(cls, name_or_path: str) -> MegatronTokenizerAdapter:
        """Load with `load_tokenizer` and wrap."""
        return cls(load_tokenizer(name_or_path), name=name_or_path)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""
        return encode_text(self.hf_tokenizer, text)

    def detokenize(self, ids: list[int]) -> str:
        """Text of `ids` (special tokens kept)."""
        return self.hf_tokenizer.decode(list(map(int, ids)))

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any:
        """Delegate to the HF tokenizer's chat template."""
        return self.hf_tokenizer.apply_chat_template(conversation, **kwargs)

    @property
    def vocab(self) -> dict[str, int]:
        return self.hf_tokenizer.get_vocab()

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        """All ids the tokenizer can produce, added tokens included (`len(hf_tokenizer)`)."""
        return len(self.hf_tokenizer)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def bos(self) -> int | None:
        return self.hf_tokenizer.bos_token_id

    @property
    def pad(self) -> int:
        """A pad id distinct from eod, else -1 (Megatron's "no pad token" sentinel)."""
        pad = self.hf_tokenizer.pad_token_id
        return -1 if pad is None or pad == self._eod else int(pad)

    @property
    def pad_token_id(self) -> int:
        """The id to pad batches with (the HF pad token, else eod)."""
        pad = self.hf_tokenizer.pad_token_id
        return self._eod if pad is None else int(pad)
