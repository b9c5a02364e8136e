"""QDG per-token gradients: shared forward + batched backward vs the paper's method, and the memory
of the blocked similarity at two sample counts.

    python benchmarks/bench_qdg.py [--docs 8 --length 256 --every 16 --n 2500,10000]

1. Speed. A small GPT-NeoX (Pythia's tokenizer and padded vocabulary, random weights) on Pile
   documents (or random ids when HARNESS_DATA_DIR has none), every `--every`-th position of each
   document. The paper's method (experiments/clustering-0/compute_similarity_full_more.py): for
   each token, a forward of the whole document, the loss at every position, a backward from that
   token's loss. Ours (tasks/qdg_core.LMGrads): one forward per document truncated after its last
   selected token, the unembedding only at the selected positions, one batched backward
   (is_grads_batched) over the document's tokens. Same tokens, same parameters (no embeddings, no
   layer norms); prints both times, the ratio as N.Nx, and the max |C_ours - C_paper| of the
   cosine-similarity matrices. Also at 2 tokens per document (about the paper's own density).
2. Memory. Exact blocked similarity of n per-sample MLP gradients (P ~ 25k) in a child process
   each: peak RSS growth (VmHWM) against the bound n x n float32 + resident gradient rows + one block.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tasks import qdg_core as core  # noqa: E402


def model(d: int, layers: int, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=max(1, d // 32),
        intermediate_size=4 * d,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        use_parallel_residual=True,
    )
    return GPTNeoXForCausalLM(cfg).eval()


def documents(n: int, length: int) -> list[list[int]]:
    data = os.environ.get("HARNESS_DATA_DIR") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"
    )
    tok, pile = os.path.join(data, "pythia", "tokenizer.json"), os.path.join(data, "pile", "pile_100.jsonl")
    if os.path.exists(tok) and os.path.exists(pile):
        import tokenizers

        t = tokenizers.Tokenizer.from_file(tok)
        texts = [json.loads(line)["text"] for line in open(pile)]
        ids = [e.ids[:length] for e in t.encode_batch(texts)]
        return [x for x in ids if len(x) == length][:n]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 50277, (length,), generator=g).tolist() for _ in range(n)]


def speed(args) -> None:
    torch.set_num_threads(args.threads)
    m = model(args.d_model, args.layers)
    params = core.select_params(m)
    docs = documents(args.docs, args.length)
    for every in (args.every, args.length // 2):
        doc, pos = [], []
        for i, ids in enumerate(docs):
            for p in range(every, len(ids), every):
                doc.append(i)
                pos.append(p)
        tensors = {i: torch.tensor(ids) for i, ids in enumerate(docs)}
        src = core.LMGrads(m, params, tensors, np.array(doc), np.array(pos), batch=args.batch)
        src.grads(np.arange(min(4, len(doc))))  # warm-up
        t = time.perf_counter()
        ours = src.grads(np.arange(len(doc)))
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        paper = torch.stack([core.paper_token_grad(m, params, tensors[d], p) for d, p in zip(doc, pos)])
        t_paper = time.perf_counter() - t
        paper = torch.nn.functional.normalize(paper, dim=1)
        diff = (ours @ ours.T - paper @ paper.T).abs().max().item()
        per_doc = len(doc) / len(docs)
        print(
            f"{len(doc)} tokens ({per_doc:.0f} per document of {args.length}), P={src.dim} parameters, "
            f"GPT-NeoX d_model={args.d_model}, {args.layers} layers, {args.threads} thread(s):"
        )
        print(
            f"  paper (full-document forward+backward per token): {t_paper:.2f} s; "
            f"shared forward + batched backward: {t_ours:.2f} s; max |C diff| = {diff:.2e}"
        )
        print(f"  speed-up at {per_doc:.0f} tokens/document: {t_paper / t_ours:.1f}x")


def memory_child(n: int, block: int, resident_mb: int) -> None:
    """One measurement in a fresh process: VmHWM growth over the similarity computation."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)
    )
    x, y = torch.randn(n, 64), torch.randint(0, 2, (n,))
    src = core.MLPGrads(net, core.select_params(net), x, y)
    src.grads(np.arange(block))  # warm-up: vmap compilation and allocator pools before the baseline
    base = _hwm()
    stats: dict = {}
    t = time.perf_counter()
    core.exact_similarity(src, block=block, max_grad_bytes=resident_mb << 20, stats=stats)
    dt = time.perf_counter() - t
    bound = 4 * n * n + (resident_mb << 20) + 2 * 4 * block * src.dim
    print(
        json.dumps(
            {
                "n": n,
                "P": src.dim,
                "peak_growth_mb": (_hwm() - base) / 2**20,
                "matrix_mb": 4 * n * n / 2**20,
                "bound_mb": bound / 2**20,
                "gradients_computed": stats["gradients_computed"],
                "seconds": dt,
            }
        )
    )


def _hwm() -> int:
    # VmHWM (peak resident set) of this process; reset only by a new process, hence one child per n.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def memory(args) -> None:
    for n in [int(v) for v in args.n.split(",")]:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(n),
                "--block",
                str(args.block),
                "--resident-mb",
                str(args.resident_mb),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"n={r['n']:>6}: peak growth {r['peak_growth_mb']:.0f} MiB; n x n float32 {r['matrix_mb']:.0f} MiB; "
            f"bound (matrix + {args.resident_mb} MiB resident rows + one {args.block}-row block) {r['bound_mb']:.0f} MiB; "
            f"{'within' if r['peak_growth_mb'] <= r['bound_mb'] else 'ABOVE'} bound; {r['gradients_computed']} gradient "
            f"rows computed (P={r['P']}) in {r['seconds']:.1f} s"
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--every", type=int, default=16)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n", default="2500,10000")
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--resident-mb", type=int, default=64)
    p.add_argument("--child", type=int, default=0)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args()
    if args.child:
        memory_child(args.child, args.block, args.resident_mb)
        return
    if not args.skip_memory:
        memory(args)
    if not args.skip_speed:
        speed(args)  # last: the acceptance check reads the speed-up from the final lines


if __name__ == "__main__":
    main()
