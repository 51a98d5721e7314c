"""PyTorch eager reference for client/examples/train_throughput.rs.

Same model (Llama-style, tied embeddings, RMSNorm, RoPE rotate_half, SDPA, SwiGLU), same
optimizer step (AdamW betas 0.9/0.95, no decay on norms, global-norm clipping 1.0), same random
batch shape and thread count. Prints one JSON line with tokens/s.

    .venv/bin/python bench/torch_reference.py --preset tiny --batch 8 --seq 128 --threads 2
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

PRESETS = {  # layers, d_model, heads, multiple_of
    "tiny": (2, 128, 4, 128),
    "75m": (3, 896, 16, 256),
    "125m": (12, 768, 12, 256),
    "350m": (24, 1024, 16, 256),
    "1.3b": (24, 2048, 16, 256),
}


class Block(torch.nn.Module):
    def __init__(self, d, f, heads):
        super().__init__()
        self.heads = heads
        self.input_layernorm = torch.nn.Parameter(torch.ones(d))
        self.post_attention_layernorm = torch.nn.Parameter(torch.ones(d))
        self.q = torch.nn.Linear(d, d, bias=False)
        self.k = torch.nn.Linear(d, d, bias=False)
        self.v = torch.nn.Linear(d, d, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)
        self.gate = torch.nn.Linear(d, f, bias=False)
        self.up = torch.nn.Linear(d, f, bias=False)
        self.down = torch.nn.Linear(f, d, bias=False)

    def forward(self, x, cos, sin, eps):
        b, t, d = x.shape
        h = F.rms_norm(x, (d,), self.input_layernorm, eps)

        def heads(y):
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        def rope(y):
            y1, y2 = y.chunk(2, dim=-1)
            return y * cos + torch.cat((-y2, y1), dim=-1) * sin

        q, k, v = rope(heads(self.q(h))), rope(heads(self.k(h))), heads(self.v(h))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        h = F.rms_norm(x, (d,), self.post_attention_layernorm, eps)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(torch.nn.Module):
    def __init__(self, vocab, layers, d, heads, f, max_seq, theta=10000.0, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(Block(d, f, heads) for _ in range(layers))
        self.norm = torch.nn.Parameter(torch.ones(d))
        hd = d // heads
        inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        freqs = torch.outer(torch.arange(max_seq).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, 0.0, 0.02)

    def loss(self, tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        t = inputs.shape[1]
        x = self.embed(inputs)
        cos, sin = self.cos[:t], self.sin[:t]
        for blk in self.blocks:
            x = blk(x, cos, sin, self.eps)
        x = F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)
        logits = F.linear(x, self.embed.weight)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab", type=int, default=258)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers, d, heads, multiple_of = PRESETS[args.preset]
    f = math.ceil((8 * d // 3) / multiple_of) * multiple_of
    model = Llama(args.vocab, layers, d, heads, f, max(args.seq, 128))
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() == 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.95),
    )
    batch = torch.randint(args.vocab, (args.batch, args.seq + 1))

    def step():
        opt.zero_grad(set_to_none=False)
        loss = model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    loss = 0.0
    fastest = float("inf")  # least disturbed by other load on a shared machine
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        fastest = min(fastest, time.perf_counter() - t)
    secs = time.perf_counter() - start
    tokens = args.steps * args.batch * args.seq
    print(json.dumps({
        "impl": "pytorch-eager",
        "torch": torch.__version__,
        "preset": args.preset,
        "params": params,
        "vocab": args.vocab,
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "steps": args.steps,
        "step_ms": 1000.0 * secs / args.steps,
        "tokens_per_s": tokens / secs,
        "min_step_ms": 1000.0 * fastest,
        "peak_tokens_per_s": args.batch * args.seq / fastest,
        "final_loss": loss,
    }))


if __name__ == "__main__":
    main()
