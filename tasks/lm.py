"""The language-model toolkit shared by the LM tasks (pythia_eval, quanta_discovery): a causal LM and its
fast tokenizer loaded from the hub or a local directory, per-token losses that never hold a batch's
logits, and documents read from JSONL(.zst), a folder or a Hugging Face dataset.

The loaders take any config with `model` (ModelConfig), `data` (DataConfig) and `data_dir`: a task's
own run config, or an `LMSource`.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from harness.config.resources import data_root
from harness.config.run import data_dir
from harness.errors import ConfigError
from harness.training.nn import n_params
from tasks.configs.lm import DataConfig, LMSource, ModelConfig  # noqa: F401  (part of this module's API)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Embedding tables are often padded past the tokenizer (Pythia: 50304 rows for 50281 ids); more slack
# than this means the tokenizer belongs to another model.
VOCAB_SLACK = 128

# -- model and tokenizer -------------------------------------------------------------------------


def _local_path(path: str, cfg) -> str | None:
    if os.path.exists(path):
        return path
    root = data_root(cfg.data_dir)
    if root and not os.path.isabs(path) and os.path.exists(os.path.join(root, path)):
        return os.path.join(root, path)
    return None


def _from_pretrained(auto, cfg, local: str | None, **kwargs):
    """`auto.from_pretrained` of the local model directory, else of the hub name at its revision."""
    m, offline = cfg.model, os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    return auto.from_pretrained(
        local or m.name, revision=None if local else m.revision, local_files_only=bool(local) or offline, **kwargs
    )


def local_model_dir(cfg) -> str | None:
    """A local model directory; its `<revision>/` subdirectory when there is one (offline checkpoints)."""
    local = _local_path(cfg.model.name, cfg)
    if local and cfg.model.revision and os.path.isdir(os.path.join(local, cfg.model.revision)):
        return os.path.join(local, cfg.model.revision)
    return local


def load_model(cfg) -> nn.Module:
    from transformers import AutoModelForCausalLM

    m, local = cfg.model, local_model_dir(cfg)
    try:
        model = _from_pretrained(AutoModelForCausalLM, cfg, local, dtype=DTYPES[m.dtype])
    except (OSError, ValueError) as e:
        if local:
            raise ConfigError(
                f"model.name={m.name!r}: the local directory holds no loadable causal LM ({str(e).splitlines()[0]})"
            ) from None
        raise ConfigError(
            f"model.name={m.name!r} revision={m.revision!r} cannot be loaded: it needs the "
            "Hugging Face hub (unreachable or offline here) or a local model directory"
        ) from None
    return model.eval()


class Tokenizer:
    """A fast (Rust) tokenizer: documents -> token ids, ids -> text."""

    def __init__(self, backend, add_special_tokens: bool = False):
        self.backend, self.add_special = backend, add_special_tokens

    @property
    def size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str], max_len: int) -> list[list[int]]:
        return [e.ids[:max_len] for e in self.backend.encode_batch(texts, add_special_tokens=self.add_special)]

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(cfg) -> Tokenizer:
    import tokenizers

    m = cfg.model
    if m.tokenizer:
        path = _local_path(m.tokenizer, cfg)
        if path is None or not os.path.isfile(path):
            raise ConfigError(
                f"model.tokenizer={m.tokenizer!r} is not a tokenizer.json file (relative paths are under data_dir)"
            )
        return Tokenizer(tokenizers.Tokenizer.from_file(path), m.add_special_tokens)
    from transformers import AutoTokenizer

    try:
        tok = _from_pretrained(AutoTokenizer, cfg, local_model_dir(cfg))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.name={m.name!r} has no loadable tokenizer ({str(e).splitlines()[0]}); "
            "set model.tokenizer=PATH/tokenizer.json"
        ) from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise ConfigError(
            f"the tokenizer of {m.name!r} is not a fast tokenizer; set model.tokenizer=PATH/tokenizer.json"
        )
    return Tokenizer(tok.backend_tokenizer, m.add_special_tokens)


def load_model_and_tokenizer(cfg) -> tuple[nn.Module, Tokenizer]:
    """`load_model`, `load_tokenizer`, and a one-line error when the tokenizer is another model's."""
    model, tok, m = load_model(cfg), load_tokenizer(cfg), cfg.model
    rows = model.get_input_embeddings().num_embeddings
    if tok.size > rows or rows - tok.size > VOCAB_SLACK:
        raise ConfigError(
            f"tokenizer and model do not match (model.name={m.name!r}, model.tokenizer="
            f"{m.tokenizer or 'its own'!r}): the tokenizer has {tok.size} ids, the model's embedding {rows} rows"
        )
    return model, tok


def split_head(model: nn.Module) -> bool:
    """Whether the logits are `output_embeddings(base_model(x))` (not for models that scale or soft-cap
    them), checked numerically on the model's device; no_grad, as the model may need gradients later."""
    head = model.get_output_embeddings()
    if head is None or model.base_model is model or not isinstance(head, nn.Linear):
        return False
    ids = torch.arange(2, 10, device=head.weight.device)[None]
    with torch.no_grad():
        full = model(input_ids=ids).logits.float()
        split = head(model.base_model(input_ids=ids).last_hidden_state).float()
    return split.shape == full.shape and torch.allclose(split, full, atol=1e-4, rtol=1e-4)


def embedding_params(model: nn.Module) -> dict[int, nn.Parameter]:
    """The input and output embeddings' parameters by id (tied ones once; none for a model without them)."""
    mods = [getattr(model, get, lambda: None)() for get in ("get_input_embeddings", "get_output_embeddings")]
    return {id(p): p for mod in mods if mod is not None for p in mod.parameters()}


def param_counts(model: nn.Module) -> dict[str, int]:
    """The run summary's total and non-embedding parameter counts: Pythia's convention drops the
    input and output embeddings."""
    total = n_params(model)
    emb = sum(p.numel() for p in embedding_params(model).values())
    return {"model/params": total, "model/params_nonembedding": total - emb}


# -- per-token losses ----------------------------------------------------------------------------


class TokenLosses(nn.Module):
    """Cross-entropy (nats, float32) of every next-token prediction of a causal LM.

    The unembedding runs only on real (unpadded) positions and `head_chunk` positions at a time, so
    the logits never exist for a whole batch ([batch, length, vocab] would be GBs for 50k vocabularies).
    Logits are made `vocab_tile` columns at a time into one buffer kept across calls, and the loss
    is computed in place (see `_chunk_losses`): a fresh [chunk, vocab] tensor per matmul costs ~35%
    of the matmul in page faults on a CPU, and F.cross_entropy allocates two more. Models whose logits are
    not `output_embeddings(base_model(x))` (soft-capping, scaling) use their own forward instead: the
    split is checked numerically once.

    Batches are right-padded, so under the causal mask no real position ever attends to padding and
    the attention mask need not reach the model (`mask_attention=False`): an explicit padding mask
    makes SDPA fall back from its causal kernel to the masked one (~1.7x slower attention on CPU).
    The mask still selects which positions are scored.
    """

    def __init__(self, lm: nn.Module, head_chunk: int = 512, mask_attention: bool = False, vocab_tile: int = 1024):
        super().__init__()
        self.lm, self.head_chunk, self.mask_attention = lm, head_chunk, mask_attention
        self.vocab_tile = vocab_tile
        self.split = split_head(lm)
        self._buffers: dict[tuple, torch.Tensor] = {}  # (dtype, device) -> flat logits buffer

    def _tile(self, dtype: torch.dtype, device: torch.device, rows: int, cols: int, tile: int) -> torch.Tensor:
        key = (dtype, device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(self.head_chunk * tile, dtype=dtype, device=device)
        return self._buffers[key][: rows * cols].view(rows, cols)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch, L] right-padded ids and mask -> losses of the real targets, row-major: [n_targets]."""
        targets = input_ids[:, 1:]  # [b, L-1]
        real = attention_mask[:, 1:].bool()  # [b, L-1]
        mask = attention_mask if self.mask_attention else None
        if not self.split:
            logits = self.lm(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
            return F.cross_entropy(logits[real].float(), targets[real], reduction="none")
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        hidden, targets = hidden[:, :-1][real], targets[real]  # [n, d], [n]
        out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        for o, h, t in zip(out.split(self.head_chunk), hidden.split(self.head_chunk), targets.split(self.head_chunk)):
            o.copy_(self._chunk_losses(h, t))
        return out

    def _chunk_losses(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Log-sum-exp over the vocabulary minus the target logit, one vocabulary tile at a time
        (an online softmax, as flash attention does): the tile stays in cache through its four
        elementwise passes, where [chunk, 50k vocab] logits would stream from memory each time.
        Logits are computed in the model's dtype, as transformers does, and scored in float32."""
        head = self.lm.get_output_embeddings()
        weight, bias = head.weight, head.bias
        vocab, rows, device = weight.shape[0], len(h), h.device
        tile = min(self.vocab_tile or vocab, vocab)
        top = torch.full((rows,), -torch.inf, device=device)
        total = torch.zeros(rows, device=device)
        target = torch.empty(rows, device=device)
        index = torch.arange(rows, device=device)
        for v in range(0, vocab, tile):
            w = weight[v : v + tile]
            z = self._tile(weight.dtype, device, rows, len(w), tile)
            torch.mm(h, w.t(), out=z)
            if bias is not None:
                z += bias[v : v + tile]
            if z.dtype != torch.float32:
                z = self._tile(torch.float32, device, rows, len(w), tile).copy_(z)
            here = (t >= v) & (t < v + len(w))
            target[here] = z[index[here], t[here] - v]
            new_top = torch.maximum(top, z.amax(1))
            total.mul_(torch.exp(top - new_top)).add_(z.sub_(new_top[:, None]).exp_().sum(1))
            top = new_top
        return total.log_().add_(top).sub_(target)


# -- documents -----------------------------------------------------------------------------------


def iter_texts(source: str, text_key: str = "text", split: str = "test") -> Iterator[str]:
    """Documents of a JSONL(.zst) file, a folder of text files, or hf:NAME[:CONFIG], in order."""
    if source.startswith("hf:"):
        yield from _iter_hf(source[3:], text_key, split)
    elif os.path.isdir(source):
        files = sorted(f for f in glob.glob(os.path.join(source, "**", "*"), recursive=True) if os.path.isfile(f))
        for f in files:
            with open(f, encoding="utf-8", errors="replace", newline="") as fh:
                yield fh.read()
    else:
        yield from _iter_jsonl(source, text_key)


def documents(source: str, d, slot: int = 0, n_slots: int = 1) -> Iterator[tuple[int, str]]:
    """(index, text) of the documents of `d` (a DataConfig's first_doc, n_docs, text_key, split)
    whose index r from first_doc has r % n_slots == slot, in order."""
    stop = d.first_doc + d.n_docs if d.n_docs else None
    for i, text in enumerate(iter_texts(source, d.text_key, d.split)):
        if stop is not None and i >= stop:
            return
        if i >= d.first_doc and (i - d.first_doc) % n_slots == slot:
            yield i, text


def _iter_jsonl(path: str, text_key: str) -> Iterator[str]:
    with open(path, "rb") as raw:
        if path.endswith(".zst"):
            import zstandard

            raw = zstandard.ZstdDecompressor().stream_reader(raw)
        for i, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8")):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: line {i + 1} is not JSON ({e.msg})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get(text_key), str):
                keys = ", ".join(doc) if isinstance(doc, dict) else type(doc).__name__
                raise ConfigError(
                    f"{path}: line {i + 1} has no string field {text_key!r} (found: {keys}); set data.text_key"
                )
            yield doc[text_key]


def _iter_hf(spec: str, text_key: str, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.source=hf:... needs the `datasets` package (pip install datasets)") from None
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # datasets raises many types for "not found / offline"; say which in one line
        raise ConfigError(
            f"data.source=hf:{spec} split={split!r} cannot be loaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    for doc in ds:
        if text_key not in doc:
            raise ConfigError(f"dataset {name}: no field {text_key!r} (found: {', '.join(doc)}); set data.text_key")
        yield doc[text_key]


def resolve_source(cfg) -> str:
    src = cfg.data.source
    if src.startswith("hf:"):
        return src
    path = src if os.path.isabs(src) else os.path.join(data_dir(cfg), src)
    if not os.path.exists(path):
        raise ConfigError(f"data.source={src!r}: {path} does not exist (relative sources are under data_dir)")
    return path
