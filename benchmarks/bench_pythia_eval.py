"""Tokens/s of the `pythia_eval` pipeline against the reference approach, and its peak memory.

    python benchmarks/bench_pythia_eval.py [--docs 40] [--reps 5] [--d-model 128] [--layers 4]

Speed: both sides score the same documents of pile_100.jsonl (truncated to --context tokens) with the
same GPT-NeoX model (Pythia's vocabulary, random weights: speed does not depend on them), in one
process, alternating which goes first so that load from other processes hits both alike.
  reference: one document per forward pass, gradients enabled, full logits, F.cross_entropy per doc.
  harness:   what the task's validation loop runs: DocumentBatches (tokenise, sort by length, pack
             padded batches with an attention mask) -> TokenLosses under inference_mode (unembedding on
             real positions only, in chunks) -> RowWriter (parquet row groups).
Target: harness >= 3x reference. Also timed: the unembedding matmul alone, on the fastest schedule
found (the harness's tiles): the floor for any exact evaluation (with a 50k vocabulary it is most of
the work on a CPU).
Memory: peak RSS of the harness pipeline in a fresh process for N and 4N documents (pile_100 cycled):
flat, because documents stream through `sort_buffer` at a time and rows leave in row groups.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.config.run import load_config  # noqa: E402
from tasks import lm  # noqa: E402
from tasks import pythia_eval as pe  # noqa: E402
from tasks.pythia_suite import ModelConfig as SuiteModel  # noqa: E402
from tasks.pythia_suite import make_model  # noqa: E402


def setup(args):
    import tokenizers

    root = os.environ.get("HARNESS_DATA_DIR")
    if not root:
        sys.exit("bench_pythia_eval: set HARNESS_DATA_DIR to the data directory (../shared/data here)")
    tok = lm.Tokenizer(tokenizers.Tokenizer.from_file(os.path.join(root, "pythia", "tokenizer.json")))
    torch.manual_seed(0)
    model = make_model(SuiteModel(d_model=args.d_model, n_layers=args.layers), 50304).eval()
    cfg = load_config(
        [
            "task=pythia_eval",
            f"data_dir={root}",
            "data.source=pile/pile_100.jsonl",
            f"data.n_docs={args.docs}",
            f"data.context_length={args.context}",
            f"eval.batch_tokens={args.batch_tokens}",
            f"eval.head_chunk={args.head_chunk}",
        ]
    )
    return tok, model, cfg, os.path.join(root, "pile", "pile_100.jsonl")


def reference(model, tok, texts: list[str], context: int) -> int:
    n, out = 0, []
    for ids in tok.encode(texts, context):
        if len(ids) < 2:
            continue
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits  # [1, L, vocab], with autograd graph
        loss = F.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="none")
        out.append(loss.detach().tolist())
        n += len(ids) - 1
    return n


def head_only(model, tok, texts: list[str], context: int, chunk: int, tile: int) -> int:
    """Only the unembedding matmul of every scored position, on the fastest schedule found here (the
    harness's: `chunk` positions x `tile` vocabulary entries into one reused buffer): a floor on the
    time of any exact evaluation in the model's dtype."""
    weight = model.get_output_embeddings().weight
    buf = torch.empty(chunk, tile)
    n = 0
    with torch.inference_mode():
        for ids in tok.encode(texts, context):
            if len(ids) >= 2:
                hidden = torch.randn(len(ids) - 1, weight.shape[1])
                for s in range(0, len(hidden), chunk):
                    h = hidden[s : s + chunk]
                    for v in range(0, weight.shape[0], tile):
                        w = weight[v : v + tile]
                        torch.mm(h, w.t(), out=buf.view(-1)[: len(h) * len(w)].view(len(h), len(w)))
                n += len(ids) - 1
    return n


def harness(losses: lm.TokenLosses, cfg, tok, source: str, out_path: str) -> int:
    writer = pe.RowWriter(out_path, cfg.eval.row_group_rows)
    n = 0
    with torch.inference_mode():
        for b in pe.DocumentBatches(cfg, tok, source, 0, 1):
            ids, mask = b["input_ids"], b["attention_mask"]
            loss = losses(ids, mask)
            real = mask[:, 1:].bool()
            pos = torch.arange(1, ids.shape[1]).expand_as(real)
            writer.add(
                doc=b["doc"][:, None].expand_as(real)[real].numpy(),
                pos=pos[real].numpy(),
                token=ids[:, 1:][real].numpy(),
                loss=loss.numpy(),
            )
            n += len(loss)
    writer.close()
    return n


def speed(args) -> dict:
    tok, model, cfg, source = setup(args)
    texts = [json.loads(line)["text"] for line in open(source)][: args.docs]
    losses = lm.TokenLosses(model, cfg.eval.head_chunk)
    tmp = tempfile.mkdtemp(prefix="bench_pythia_")
    rates = {"reference": [], "harness": [], "head": []}
    reference(model, tok, texts[:2], args.context)  # warm-up: first-call allocations and kernel choices
    harness(losses, cfg, tok, source, os.path.join(tmp, "warmup.parquet"))
    for rep in range(args.reps):
        order = ["reference", "harness", "head"] if rep % 2 == 0 else ["head", "harness", "reference"]
        for side in order:
            t = time.perf_counter()
            if side == "reference":
                n = reference(model, tok, texts, args.context)
            elif side == "head":
                n = head_only(model, tok, texts, args.context, cfg.eval.head_chunk, cfg.eval.vocab_tile)
            else:
                n = harness(losses, cfg, tok, source, os.path.join(tmp, f"{rep}.parquet"))
            rates[side].append(n / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"tokens": n, "tokens_per_s": med, "all": rates, "ratio": med["harness"] / med["reference"]}


def peak_rss_mib() -> float:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a child started by
    # this (large) benchmark process would report the parent's peak.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def memory_child(args) -> None:
    """One harness pass over `--docs` documents (pile_100 cycled); prints peak RSS in MiB."""
    pe.bound_heap()  # as the task's build() does
    tok, model, cfg, source = setup(args)
    base = peak_rss_mib()
    texts = [line for line in open(source)]
    with tempfile.TemporaryDirectory() as tmp:
        big = os.path.join(tmp, "docs.jsonl")
        with open(big, "w") as f:
            for i in range(args.docs):
                f.write(texts[i % len(texts)].rstrip("\n") + "\n")
        n = harness(lm.TokenLosses(model, cfg.eval.head_chunk), cfg, tok, big, os.path.join(tmp, "out.parquet"))
    peak = peak_rss_mib()
    print(json.dumps({"docs": args.docs, "tokens": n, "peak_rss_mib": peak, "after_setup_mib": base}))


def memory(args, sizes: list[int]) -> list[dict]:
    out = []
    for docs in sizes:
        argv = [
            sys.executable,
            __file__,
            "--memory-child",
            "--docs",
            str(docs),
            "--d-model",
            str(args.d_model),
            "--layers",
            str(args.layers),
            "--context",
            str(args.context),
            "--batch-tokens",
            str(args.batch_tokens),
            "--head-chunk",
            str(args.head_chunk),
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=40)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--head-chunk", type=int, default=512)
    p.add_argument("--memory-docs", type=int, default=100, help="memory at this many documents and 4x")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.memory_child:
        return memory_child(args)
    s = speed(args)
    r = s["tokens_per_s"]
    print(
        f"model d_model={args.d_model} layers={args.layers} vocab=50304, {args.docs} docs, {s['tokens']} tokens, 1 thread"
    )
    print(
        f"reference (1 doc/forward, grad): {r['reference']:8.0f} tokens/s   runs: {[round(x) for x in s['all']['reference']]}"
    )
    print(
        f"harness (batched, inference):    {r['harness']:8.0f} tokens/s   runs: {[round(x) for x in s['all']['harness']]}"
    )
    print(f"speed-up: {s['ratio']:.2f}x (target >= 3x)")
    print(
        f"unembedding matmul alone (fastest schedule): {r['head']:5.0f} tokens/s: no exact float32 evaluation "
        f"can beat the reference by more than {r['head'] / r['reference']:.2f}x on this machine"
    )
    for m in memory(args, [args.memory_docs, 4 * args.memory_docs]):
        print(
            f"peak RSS, {m['docs']:5d} docs / {m['tokens']:7d} tokens: {m['peak_rss_mib']:.0f} MiB "
            f"(after loading the model: {m['after_setup_mib']:.0f} MiB)"
        )


if __name__ == "__main__":
    main()
