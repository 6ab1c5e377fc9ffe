"""Peak memory of the DINO and iBOT cross-entropies (forward + backward) at K = 65,536: dinokit's
memory-lean functions against the plain autograd formula, each in a fresh subprocess, measured as
the growth of the process's maximum resident set size over the inputs (CPU) or as
``torch.cuda.max_memory_allocated`` growth (``--device cuda``).

    .venv/bin/python benchmarks/loss_memory.py            # B=16, 2 + 10 views, K=65536
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch


def _peak(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, impl: str, a: dict) -> dict:
    from dinokit.losses.dino import dino_cross_entropy
    from dinokit.losses.ibot import ibot_patch_loss

    torch.manual_seed(0)
    dev, k, b = a["device"], a["k"], a["batch"]
    # inputs made in place, so that no temporary raises the baseline peak
    s_shape, t_shape = ((a["n_student"], b, k), (a["n_teacher"], b, k)) if kind == "dino" else \
        ((a["rows"], k), (a["rows"], k))
    s = torch.empty(s_shape, device=dev).normal_().requires_grad_()
    t = torch.empty(t_shape, device=dev).uniform_()
    t /= t.sum(-1, keepdim=True)
    w = None if kind == "dino" else torch.full((a["rows"],), 1.0 / 59, device=dev)
    base = _peak(dev)
    if impl == "lean":
        loss = dino_cross_entropy(s, t, 0.1) if kind == "dino" else ibot_patch_loss(s, t, w, 2 * b, 0.1)
    elif kind == "dino":  # the plain autograd formula (what dinokit had before)
        log_p = torch.log_softmax(s.float() / 0.1, -1)
        ce = -torch.einsum("tbk,sbk->ts", t.float(), log_p) / b
        loss = (ce.sum() - ce.diagonal().sum()) / (t.shape[0] * s.shape[0] - t.shape[0])
    else:
        log_p = torch.log_softmax(s.float() / 0.1, -1)
        loss = -torch.where(w != 0, (t * log_p).sum(-1) * w, 0.0).sum() / (2 * b)
    loss.backward()
    copy_mb = s.numel() * 4 / 2**20
    return {"kind": kind, "impl": impl, "extra_peak_mb": _peak(dev) - base, "one_fp32_copy_mb": copy_mb,
            "loss": float(loss)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=65536)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n-teacher", type=int, default=2)
    p.add_argument("--n-student", type=int, default=12)
    p.add_argument("--rows", type=int, default=0, help="iBOT masked rows (default: 30 %% of 2 x B x 196)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    a = {"k": args.k, "batch": args.batch, "n_teacher": args.n_teacher, "n_student": args.n_student,
         "rows": args.rows or int(round(0.3 * 196)) * 2 * args.batch, "device": args.device}
    print(f"K={a['k']}, B={a['batch']}, DINO {a['n_teacher']} teacher x {a['n_student']} student views, "
          f"iBOT {a['rows']} rows; extra peak memory of forward + backward over the inputs:")
    for kind in ("dino", "ibot"):
        for impl in ("autograd", "lean"):
            # big blocks straight from mmap and back to the OS when freed, so RSS follows the tensors
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            r = subprocess.run([sys.executable, __file__, "--child", kind, impl, json.dumps(a)],
                               capture_output=True, text=True, env=env)
            try:
                res = json.loads(r.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                print(f"  {kind} {impl}: failed: {r.stderr.strip()[-300:]}")
                continue
            print(f"  {kind:5s} {impl:9s} {res['extra_peak_mb']:8.0f} MB = "
                  f"{res['extra_peak_mb'] / res['one_fp32_copy_mb']:.2f} fp32 copies of the student logits "
                  f"({res['one_fp32_copy_mb']:.0f} MB); loss {res['loss']:.6f}")


if __name__ == "__main__":
    main()
