"""nanoGPT's shakespeare_char training loop in PyTorch, for side-by-side speed and loss figures.

Runs in its own environment with torch installed (never jaxlab's .venv), e.g.

    make torch-env   # .venv-torch: numpy and a CPU build of torch (see the Makefile)
    .venv-torch/bin/python scripts/nanogpt_torch_baseline.py --max_iters=2000

It re-implements what nanoGPT's model.py and train.py do at the CPU command of its README
(`--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0` on
top of config/train_shakespeare_char.py): no biases, exact GELU, tied output head, N(0, 0.02)
init with residual projections at 0.02/sqrt(2L), AdamW(0.9, 0.99) with decay on tensors of
rank >= 2, clip 1.0, warmup lr*(it+1)/(warmup+1) then cosine to min_lr, random windows drawn
with torch.randint, loss.item() every iteration, eval on random batches every eval_interval.

With --init_npz it starts from given weights and trains on given batches instead (written by
scripts/compare_nanogpt.py from jaxlab's model), to compare the two loops step by step.
Prints one JSON line (--json_out also writes it to a file).
"""

from __future__ import annotations

# argparse, not absl (the other commands' flags): this runs in .venv-torch, which has no absl.
import argparse
import json
import math
import os
import statistics
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SelfAttention(nn.Module):
    """Causal multi-head attention with one fused q/k/v projection, as nanoGPT's."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    """Pre-LayerNorm block (LayerNorm without bias, exact GELU MLP)."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = SelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """nanoGPT's GPT with bias=False and dropout=0."""

    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], dtype=torch.long)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def load_jax_weights(model: GPT, weights: dict[str, np.ndarray], n_layer: int) -> None:
    """Copies jaxlab GPT parameters (flattened 'h_0/attn/query/kernel' names) into the model."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
    with torch.no_grad():
        model.wte.weight.copy_(t(weights["wte/embedding"]))
        model.wpe.weight.copy_(t(weights["wpe"]))
        model.ln_f.weight.copy_(t(weights["ln_f/scale"]))
        for i, block in enumerate(model.h[:n_layer]):
            p = f"h_{i}/"
            e = weights[p + "attn/query/kernel"].shape[0]
            qkv = [weights[p + f"attn/{n}/kernel"].reshape(e, e) for n in ("query", "key", "value")]
            block.attn.c_attn.weight.copy_(t(np.concatenate(qkv, axis=1).T))
            block.attn.c_proj.weight.copy_(t(weights[p + "attn/out/kernel"].reshape(e, e).T))
            block.c_fc.weight.copy_(t(weights[p + "mlp/fc/kernel"].T))
            block.mlp_proj.weight.copy_(t(weights[p + "mlp/proj/kernel"].T))
            block.ln_1.weight.copy_(t(weights[p + "ln_1/scale"]))
            block.ln_2.weight.copy_(t(weights[p + "ln_2/scale"]))


def learning_rate(it: int, args: argparse.Namespace) -> float:
    """nanoGPT's get_lr."""
    if it < args.warmup_iters:
        return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
    if it > args.lr_decay_iters:
        return args.min_lr
    ratio = (it - args.warmup_iters) / (args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (
        args.learning_rate - args.min_lr
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data",
                                                       "tinyshakespeare", "input.txt"))  # fmt: skip
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--batch_size", type=int, default=12)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--max_iters", type=int, default=2000)
    parser.add_argument("--lr_decay_iters", type=int, default=2000)
    parser.add_argument("--warmup_iters", type=int, default=100)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--min_lr", type=float, default=1e-4)
    parser.add_argument("--eval_interval", type=int, default=250)
    parser.add_argument("--eval_iters", type=int, default=20)
    parser.add_argument("--final_eval_iters", type=int, default=500,
                        help="extra, larger validation estimate at the end (0: skip)")  # fmt: skip
    parser.add_argument("--init_npz", default=None, help="jaxlab weights + batches to follow")
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = np.array([stoi[c] for c in text], dtype=np.int64)
    split = int(0.9 * len(data))
    splits = {"train": torch.from_numpy(data[:split]), "val": torch.from_numpy(data[split:])}

    def get_batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = splits[name]
        ix = torch.randint(len(d) - args.block_size, (args.batch_size,))
        x = torch.stack([d[i : i + args.block_size] for i in ix])
        y = torch.stack([d[i + 1 : i + 1 + args.block_size] for i in ix])
        return x, y

    model = GPT(len(chars), args.block_size, args.n_layer, args.n_head, args.n_embd)
    given = None
    if args.init_npz:
        given = dict(np.load(args.init_npz))
        load_jax_weights(model, given, args.n_layer)
        args.max_iters = min(args.max_iters, len(given["batches"]))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.99))

    @torch.no_grad()
    def estimate_loss(name: str, iters: int) -> float:
        model.eval()
        losses = [model(*get_batch(name)).item() for _ in range(iters)]
        model.train()
        return float(np.mean(losses))

    def next_batch(it: int) -> tuple[torch.Tensor, torch.Tensor]:
        if given is None:
            return get_batch("train")
        b = torch.from_numpy(given["batches"][it].astype(np.int64))
        return b[:, :-1], b[:, 1:]

    curve, losses, times = [], [], []
    x, y = next_batch(0)
    start = time.perf_counter()
    for it in range(args.max_iters + 1):
        lr = learning_rate(it, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if given is None and it % args.eval_interval == 0:
            curve.append({"iter": it, "train": estimate_loss("train", args.eval_iters),
                          "val": estimate_loss("val", args.eval_iters)})  # fmt: skip
            train_loss, val_loss = curve[-1]["train"], curve[-1]["val"]
            print(f"step {it}: train loss {train_loss:.4f}, val loss {val_loss:.4f}", flush=True)
        if it == args.max_iters:
            break  # nanoGPT also evaluates at max_iters; its one extra step changes nothing here
        t0 = time.perf_counter()
        loss = model(x, y)
        x, y = next_batch(it + 1) if it + 1 < args.max_iters else (x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start

    steady = times[10:] if len(times) > 20 else times
    ms = 1000 * statistics.median(steady)
    result = {
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "iters": len(times),
        "median_ms_per_iter": ms,
        "tokens_per_sec": args.batch_size * args.block_size / (ms / 1000),
        "wall_s": wall,
        "train_losses": losses if given is not None else losses[-1:],
    }
    if curve:
        result["curve"] = curve
        result["val_loss"] = curve[-1]["val"]
    if given is None and args.final_eval_iters:
        result["val_loss_final_eval"] = estimate_loss("val", args.final_eval_iters)
        result["final_eval_iters"] = args.final_eval_iters
    line = json.dumps(result)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
