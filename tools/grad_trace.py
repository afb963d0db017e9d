"""Per-step trace of an AMLN cohort's per-term gradients (a finer view than
``run.log_grad_norms``, which averages per epoch; docs/accuracy.md uses it).

Builds the peers of a config, trains them with
the same publish/learn loop as the local backend, and every K steps, just before a
peer's real ``learn`` call, measures for that peer:

- for each loss term as it enters the loss (T^2, beta and ramp-up included), the L2
  norm of its gradient w.r.t. the backbone's parameters (``model.parameters()``),
  plus the per-block contributions of ``feat`` and ``adv`` and the cosine of each
  distillation term's gradient with CE's;
- the discriminator's accuracy per block (own features -> "own", teacher's -> "teacher");
- the RMS of each own block feature and of the teacher's final block feature.

Usage:
    python tools/grad_trace.py --every 10 --out trace.csv -- key=value ...
The overrides are the same as ``python -m cohort.run`` takes.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cohort.config import load_config  # noqa: E402
from cohort.methods import functional as L  # noqa: E402
from cohort.methods.base import teacher_key  # noqa: E402
from cohort.peer import Peer  # noqa: E402


def grad_norm(value: torch.Tensor, params: list[torch.nn.Parameter]) -> tuple[float, torch.Tensor]:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
    return float(flat.norm()), flat


def measure(peer: Peer, step: int, teacher_messages) -> dict[str, float]:
    """Everything about one peer at one step, without changing its state."""
    _, output, targets, _ = peer._pending
    teachers = peer.receive(teacher_messages)  # as Peer.learn sees them
    cfg = peer.method.config
    params = [p for p in peer.model.parameters() if p.requires_grad]
    row: dict[str, float] = {}
    for p in peer.critic_params:
        p.requires_grad_(False)
    try:
        with peer.autocast():  # as Peer.learn computes its losses
            terms = peer.method.losses(output, targets, teachers, peer.extras)
            spe = peer.data.plan.steps_per_epoch
            terms = peer.method.ramp(terms, step + 1, spe)
            flats = {}
            for name, value in terms.items():
                row[f"val_{name}"] = float(value.detach())
                row[f"g_{name}"], flats[name] = grad_norm(value, params)
            total = sum(terms.values())
            row["g_total"], _ = grad_norm(total, params)
            for name, flat in flats.items():
                if name != "ce":
                    row[f"cos_ce_{name}"] = float(torch.nn.functional.cosine_similarity(flat, flats["ce"], dim=0))
            # per-block contributions (ramped like the term they belong to)
            from cohort.methods.base import rampup_weight

            w = rampup_weight(step + 1, cfg.rampup_steps(spe) if hasattr(cfg, "rampup_steps") else 0.0)
            row["ramp"] = w
            nblocks = len(output.blocks)
            per_block = 1.0 / nblocks if getattr(cfg, "block_reduce", "sum") == "mean" else 1.0
            msg = teachers[0]
            key = teacher_key(msg.source)
            if cfg.name == "amln":
                final = msg.blocks[-1]
                row["rms_teacher_final"] = float(final.pow(2).mean().sqrt())
                row["var_teacher_final"] = float(final.var(dim=0).mean())  # per-position variance over the batch
                for b, feature in enumerate(output.blocks):
                    row[f"rms_own_b{b}"] = float(feature.detach().pow(2).mean().sqrt())
                    row[f"rms_teacher_b{b}"] = float(msg.blocks[b].pow(2).mean().sqrt())
                    if cfg.feature:
                        container = peer.extras["align"][key][b]
                        aligned = container(feature, final.shape[-2:])
                        d = L.alignment_distance(aligned, final, getattr(cfg, "feature_norm", "none"))
                        row[f"feat_b{b}"] = float(d.detach())
                        row[f"g_feat_b{b}"], _ = grad_norm(w * per_block * cfg.beta * d, params)
                    if cfg.adversarial:
                        disc = peer.extras["disc"][key][b]
                        fooling = L.log_fooling_loss if getattr(cfg, "gan_form", "linear") == "log" else L.fooling_loss
                        fool = fooling(disc(feature))
                        row[f"adv_b{b}"] = float(fool.detach())
                        weight = w * per_block * getattr(cfg, "adv_weight", 1.0)
                        row[f"g_adv_b{b}"], _ = grad_norm(weight * fool, params)
                        with torch.no_grad():
                            own_s, their_s = disc(feature.detach()), disc(msg.blocks[b])
                            p_own = L.teacher_probability(own_s)
                            p_their = L.teacher_probability(their_s)
                            row[f"dacc_own_b{b}"] = float((p_own < 0.5).float().mean())
                            row[f"dacc_teacher_b{b}"] = float((p_their > 0.5).float().mean())
                            row[f"dacc_b{b}"] = 0.5 * (row[f"dacc_own_b{b}"] + row[f"dacc_teacher_b{b}"])
                            row[f"dp_own_b{b}"] = float(p_own.mean())  # D's P(teacher) on own features
    finally:
        for p in peer.critic_params:
            p.requires_grad_(True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval", action="store_true", help="evaluate val/test at each epoch end")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    config = load_config(None, ["cohort.backend=local", *args.overrides])
    torch.manual_seed(config.run.seed)
    n = config.cohort.size
    peers = [Peer(j, config, threads=args.threads) for j in range(n)]
    spe = peers[0].data.plan.steps_per_epoch
    total_steps = spe * config.optim.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    rows: list[dict] = []
    start = time.time()
    for step in range(total_steps):
        epoch, _ = peers[0].data.plan.locate(step)
        messages = [p.publish(step) for p in peers]
        teachers = [[messages[t] for t in p.pairing.teachers(p.index, n, epoch)] for p in peers]
        measured = step % args.every == 0 or step == total_steps - 1
        if measured:
            for p in peers:
                row = {"step": step, "epoch": step / spe, "peer": p.index, "lr": p.optimizer.param_groups[0]["lr"]}
                row |= measure(p, step, teachers[p.index])
                rows.append(row)
        for p in peers:
            logged = p.learn(step, *teachers[p.index])
            if measured:
                next(r for r in reversed(rows) if r["peer"] == p.index)["train_top1"] = logged["top1"]
        if measured:
            r0 = [r for r in rows[-n:]]
            brief = " | ".join(
                " ".join(f"{k[2:]}={r[k]:.3g}" for k in r if k.startswith("g_") and "_b" not in k) for r in r0
            )
            print(f"step {step} ({time.time() - start:.0f}s): {brief}", flush=True)
        if (step + 1) % spe == 0:
            for p in peers:
                p.finish_epoch(epoch)
            if args.eval:
                splits = ["val", "test"] if peers[0].data.val is not None else ["test"]
                for split in splits:
                    acc = [p.evaluate(split)[0]["top1"] for p in peers]
                    print(f"epoch {epoch + 1} {split} top-1 " + " ".join(f"{100 * a:.2f}" for a in acc), flush=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("step", "epoch", "peer", "lr"), k))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
