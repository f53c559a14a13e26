"""CAN against an iterative primal-dual baseline on the toy world, side by side in one run.

    python benchmarks/primal_dual.py [--out benchmarks/out/primal_dual] [--quick] [--iterations N]

CAN: the MoCAN demo pipeline (prepare with K = 128 reference samples per prompt, lambda* from the
dual, 3 epochs of OpenRLHF's DPO trainer on pseudo-preferences; torchrun, 2 ranks, ZeRO-2), with an
HF checkpoint every few optimizer steps so its trajectory is measured like the baseline's.
Baseline: Lagrangian policy-gradient in the style of Safe-RLHF's PPO-Lagrangian, on the same
fitted tiny reference: each iteration samples n responses for every prompt from the current
policy, rewards r + lambda_t g - beta (log pi - log pi_ref) per sequence, a per-prompt mean
baseline, PPO-clip updates (sequence-level ratio), then lambda_{t+1} = max(0, lambda_t + eta (b -
mean g)) from the batch's constraint violation. No critics (fewer models than Safe-RLHF's six).
Tuning grid: Adam lr {1e-3, 3e-3} x multiplier step eta {0.05, 0.2, 1}, constant lr or OpenRLHF's
default cosine decay to 0.1 lr over the run (eight settings; the quick run does one).

Both are evaluated by exact enumeration at every baseline iteration and every CAN checkpoint (not
counted). Compute counts tokens through the policy: forward tokens (generation: prompt prefill +
each generated token; log-prob and reference passes; training forwards) and backward tokens
(training); CAN's dual-step sampling is counted as its rollout, its DPO tokens pro rata to the
optimizer steps done. Three criteria, each with the first point that meets it and the point from
which every later one does ("held": a run whose last point misses it has no held point):
  tolerance: exact E[g] >= b - tol, tol = 0.1 (b - E_ref[g]) (the demo's acceptance);
  optimum:   tolerance and KL(policy || exact optimum) <= 0.15 KL(ref || optimum) (the demo's);
  CAN final: tolerance and KL to the optimum <= what CAN's final model reaches.
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openrlhf_dual.artifacts import read_jsonl, write_json  # noqa: E402
from openrlhf_dual.demo import world as W  # noqa: E402
from openrlhf_dual.demo.steps import DPO_BATCH, build_reference, dpo, exact_optimum, prepare  # noqa: E402

EPOCHS = 3  # the MoCAN demo's DPO epochs
POINT = ("lambda", "safety", "reward", "kl_to_optimum", "forward_tokens", "backward_tokens")


def can(out: Path, ref_dir: Path, prompts: list[str], seed: int, threshold: float, beta: float, every: int,
        exact: Callable[[W.ExactPolicy], dict]) -> dict:  # fmt: skip
    """The MoCAN pipeline, timed per stage; its trajectory (the reference, then a checkpoint every
    `every` optimizer steps and the final model) with cumulative token counts and exact results."""
    from transformers import AutoTokenizer

    t = time.perf_counter()
    sol = prepare(out, ref_dir, f"file:{out / 'reward.py'}", f"file:{out / 'safety.py'},sign=+1", threshold, beta, 32, 128, seed)
    prep_s = time.perf_counter() - t
    launched = time.time()
    steps_dir = out / "steps"
    extra = ["--dual.algo", "mocan", "--dual.prep_dir", str(out / "prep"), "--ckpt.save_steps", str(every),
             "--ckpt.save_hf", "--ckpt.disable_ds", "--ckpt.path", str(steps_dir)]  # fmt: skip
    ckpt = dpo(out, "mocan", "openrlhf_dual.cli.train_dpo", ref_dir, beta, EPOCHS, extra)
    train_s = time.time() - launched
    walls = step_walls(out / "tensorboard" / "mocan", launched)

    tok = AutoTokenizer.from_pretrained(ref_dir)
    n_tok = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    heads = {p["prompt"]: n_tok(p["prompt"]) for p in read_jsonl(out / "prep" / "prompts.jsonl")}
    samples = [r["responses"] for f in sorted((out / "prep" / "samples").glob("*.jsonl")) for r in read_jsonl(f)]
    gen = sum(heads[p] * 128 + sum(len(s["token_ids"]) for s in per) for p, per in zip(heads, samples))
    pairs = list(read_jsonl(out / "prep" / "pairs.jsonl"))
    pair_tokens = sum(2 * heads[r["prompt"]] + n_tok(r["chosen"]) + n_tok(r["rejected"]) + 2 for r in pairs)
    per_step = pair_tokens / (len(pairs) // DPO_BATCH)  # one optimizer step's chosen + rejected tokens
    points = [(0, ref_dir)] + sorted((int(re.search(r"global_step(\d+)_hf", d.name)[1]), d) for d in steps_dir.glob("global_step*_hf"))
    last = EPOCHS * (len(pairs) // DPO_BATCH)
    if points[-1][0] != last:
        points.append((last, ckpt))
    walls[last] = train_s
    traj = {k: [] for k in (*POINT, "seconds", "step")}
    for step, path in points:
        now = exact(W.exact_policy(path, prompts))
        counts = {"lambda": sol["lam"][0], "forward_tokens": gen + round(2 * per_step * step),
                  "backward_tokens": round(per_step * step), "seconds": prep_s + (walls[step] if step else 0.0),
                  "step": step}  # fmt: skip
        for key, value in {**now, **counts}.items():
            traj[key].append(value)
    return {"lambda": sol["lam"][0], "traj": traj, "prepare_seconds": prep_s, "update_seconds": train_s,
            "models_live": {"dual step": 3, "training": 2}}  # fmt: skip


def step_walls(tb_dir: Path, launched: float) -> dict[int, float]:
    """Seconds from the DPO launch (time.time()) to each optimizer step, from OpenRLHF's TensorBoard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = {p.parent for p in tb_dir.rglob("events.out.tfevents*")}
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {e.step: e.wall_time - launched for e in acc.Scalars(acc.Tags()["scalars"][0])}


def seq_logps(model, ids: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
    """Sum of log-probs of tokens from position `start` on (mask [B, T] marks real tokens) -> [B]."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    lp = logits.gather(-1, ids[:, 1:, None])[..., 0] - logits.logsumexp(-1)
    return (lp * mask[:, 1:])[:, start - 1 :].sum(-1)


def rollout(policy, tok, prompts: list[str], n: int) -> list[tuple]:
    """n sampled responses per prompt: (ids [n, T], mask [n, T] (0 after the first EOS), prompt length, texts)."""
    out = []
    for p in prompts:
        head = tok(W.format_prompt(tok, p), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            seqs = policy.generate(torch.tensor([head]), do_sample=True, top_k=0, max_new_tokens=W.RESPONSE_LEN + 1,
                                   num_return_sequences=n, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        mask = torch.ones_like(seqs)
        for row in range(n):
            eos = (seqs[row, len(head) :] == tok.eos_token_id).nonzero()
            if len(eos):
                mask[row, len(head) + int(eos[0]) + 1 :] = 0
        texts = [tok.decode(seqs[row, len(head) : int(mask[row].sum())], skip_special_tokens=True) for row in range(n)]
        out.append((seqs, mask, len(head), texts))
    return out


def primal_dual(ref_dir: Path, prompts: list[str], threshold: float, beta: float, lr: float, eta: float, schedule: str,
                iterations: int, n: int, exact: Callable[[W.ExactPolicy], dict], seed: int) -> dict:  # fmt: skip
    """The baseline; per-iteration trajectories (exact results, cumulative token counts and seconds).
    schedule: "constant" or "cosine_with_min_lr" (OpenRLHF's default: cosine to 0.1 lr over the run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(ref_dir)
    reference = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    policy = copy.deepcopy(reference).train()
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    kwargs = {"min_lr": 0.1 * lr} if schedule == "cosine_with_min_lr" else {}
    sched = get_scheduler(schedule, opt, 0, iterations * 2 * len(prompts), scheduler_specific_kwargs=kwargs)
    lam, fwd, bwd, seconds = 0.0, 0, 0, 0.0
    traj = {k: [] for k in (*POINT, "seconds")}
    for _ in range(iterations):
        t = time.perf_counter()
        policy.eval()
        batch = rollout(policy, tok, prompts, n)
        fwd += sum(int(m.sum()) for _, m, _, _ in batch)  # prefill + generated tokens
        rows = []
        for (ids, mask, start, texts), p in zip(batch, prompts):
            with torch.no_grad():
                old, ref = seq_logps(policy, ids, mask, start), seq_logps(reference, ids, mask, start)
            r = torch.tensor([W.toy_reward(p, x) for x in texts])
            g = torch.tensor([W.toy_safety(p, x) for x in texts])
            total = r + lam * g - beta * (old - ref)
            rows.append((ids, mask, start, old, total - total.mean(), g))
        fwd += 2 * sum(int(m.sum()) for _, m, _, _ in batch)
        policy.train()
        for _ in range(2):  # PPO epochs, one prompt group per minibatch
            for ids, mask, start, old, adv, _ in rows:
                ratio = torch.exp(seq_logps(policy, ids, mask, start) - old)
                loss = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                fwd, bwd = fwd + int(mask.sum()), bwd + int(mask.sum())
        mean_g = float(torch.cat([row[5] for row in rows]).mean())
        lam = max(0.0, lam + eta * (threshold - mean_g))
        seconds += time.perf_counter() - t
        policy.eval()
        now = exact(W.exact_policy_of(policy, tok, prompts))
        counts = {"lambda": lam, "forward_tokens": fwd, "backward_tokens": bwd, "seconds": seconds}
        for key, value in {**now, **counts}.items():
            traj[key].append(value)
    return traj


def reach(traj: dict, ok: Callable[[float, float], bool]) -> tuple[int | None, int | None]:
    """(first index where ok(safety, kl_to_optimum), first index from which ok holds to the end)."""
    hits = [ok(s, kl) for s, kl in zip(traj["safety"], traj["kl_to_optimum"])]
    first = hits.index(True) if any(hits) else None
    held = next((i for i in range(len(hits)) if all(hits[i:])), None)
    return first, held


def plot(can_traj: dict, configs: dict, lam_opt: float, threshold: float, floor: float, path: Path) -> None:
    """Multiplier, exact E[g] and KL to the optimum against forward tokens, CAN beside the baseline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 5.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    k = lambda t: [x / 1e3 for x in t["forward_tokens"]]  # noqa: E731
    for name, c in configs.items():
        for ax, key in zip(axes, ("lambda", "safety", "kl_to_optimum")):
            ax.plot(k(c["traj"]), c["traj"][key], lw=1, ls="--" if c["schedule"] != "constant" else "-",
                    label=f"primal-dual {name}")
    for ax, key in zip(axes, ("lambda", "safety", "kl_to_optimum")):
        ax.plot(k(can_traj), can_traj[key], "k.-", lw=2, label="CAN (dual step, then DPO)")
        ax.set_xlabel("policy forward tokens [thousands]")
    methods = axes[0].get_legend_handles_labels()
    axes[0].axhline(lam_opt, color="gray", ls=":", label=f"exact lambda* = {lam_opt:.3f}")
    axes[0].set_ylabel("multiplier lambda")
    axes[0].set_title("Multiplier: primal-dual iterates it, CAN solves it once")
    axes[1].axhline(threshold, color="darkorange", ls="--", label=f"threshold b = {threshold}")
    axes[1].axhline(floor, color="darkorange", ls=":", label=f"tolerance: E[g] >= {floor:.3f}")
    axes[1].set_ylabel("exact E[safety] of the policy")
    axes[1].set_title("Constraint value while training")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("exact KL(policy || constrained optimum) [nats]")
    axes[2].set_title("Distance to the constrained optimum")
    for ax in axes[:2]:  # reference lines only; the methods share one legend below
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[len(methods[0]) :], labels[len(methods[0]) :], fontsize=8, loc="upper right")
    fig.legend(*methods, loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(str(path))


def fmt_reach(traj: dict, at: tuple[int | None, int | None]) -> str:
    """'first / held' forward tokens in thousands ('-' where never)."""
    return " / ".join(f"{traj['forward_tokens'][i] / 1e3:.0f}k" if i is not None else "-" for i in at)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out/primal_dual")
    p.add_argument("--quick", action="store_true", help="one baseline setting, 10 iterations (smoke run)")
    p.add_argument("--iterations", type=int, default=100)
    a = p.parse_args()
    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    seed, threshold, beta, n = 0, 0.5, 0.5, 8
    ref_dir, prompts = build_reference(out / "can", 32, seed)
    reward, safety = W.score_table(prompts)
    ref = W.exact_policy(ref_dir, prompts)
    lam_opt, opt = exact_optimum(ref, reward, safety, threshold, beta)
    exact = lambda pi: {"safety": pi.expect(safety), "reward": pi.expect(reward), "kl_to_optimum": pi.kl(opt)}  # noqa: E731
    floor, kl_ref = threshold - 0.1 * (threshold - ref.expect(safety)), ref.kl(opt)
    print("CAN: prepare + one MoCAN run (the demo pipeline)", flush=True)
    c = can(out / "can", ref_dir, prompts, seed, threshold, beta, 3, exact)
    can_kl = c["traj"]["kl_to_optimum"][-1]
    criteria = {
        "tolerance": lambda s, kl: s >= floor,
        "optimum": lambda s, kl: s >= floor and kl <= 0.15 * kl_ref,
        "CAN final": lambda s, kl: s >= floor and kl <= can_kl,
    }
    cos = "cosine_with_min_lr"
    grid = [(3e-3, 1.0, cos)] if a.quick else [(1e-3, 0.05, "constant"), (1e-3, 0.2, "constant"), (1e-3, 1.0, "constant"),
                                               (3e-3, 0.2, "constant"), (3e-3, 1.0, "constant"), (1e-3, 0.05, cos),
                                               (1e-3, 0.2, cos), (3e-3, 0.2, cos)]  # fmt: skip
    iterations = 10 if a.quick else a.iterations
    configs = {}
    for lr, eta, schedule in grid:
        name = f"lr {lr:g}, eta {eta:g}" + (", cosine" if schedule == cos else "")
        print(f"primal-dual {name}: {iterations} iterations", flush=True)
        traj = primal_dual(ref_dir, prompts, threshold, beta, lr, eta, schedule, iterations, n, exact, seed)
        configs[name] = {"lr": lr, "eta": eta, "schedule": schedule, "traj": traj, "reach": {k: reach(traj, ok) for k, ok in criteria.items()}}
    c["reach"] = {k: reach(c["traj"], ok) for k, ok in criteria.items()}

    lines = [f"toy world, seed {seed}, b = {threshold}, beta = {beta}, exact lambda* = {lam_opt:.4f}; forward tokens "
             f"(thousands) to each criterion, first / held to the end of the run ('-': never):",
             f"  tolerance: E[g] >= {floor:.3f};  optimum: and KL(pi || opt) <= {0.15 * kl_ref:.3f} (0.15 KL(ref || opt));  "
             f"CAN final: and KL(pi || opt) <= {can_kl:.4f}",
             f"{'method':26s} {'tolerance':>15s} {'optimum':>15s} {'CAN final':>15s} {'end: E[g]':>9s} {'KL(opt)':>8s} "
             f"{'lambda':>6s} {'fwd':>6s} {'bwd':>6s} {'wall s':>7s}"]  # fmt: skip
    rows = {"CAN (dual step + 3 DPO epochs)": (c, c["prepare_seconds"] + c["update_seconds"])}
    rows.update({f"PD {name}": (cfg, cfg["traj"]["seconds"][-1]) for name, cfg in configs.items()})
    for name, (r, wall) in rows.items():
        t = r["traj"]
        lines.append(f"{name:26s} " + " ".join(f"{fmt_reach(t, r['reach'][k]):>15s}" for k in criteria)
                     + f" {t['safety'][-1]:9.3f} {t['kl_to_optimum'][-1]:8.4f} {t['lambda'][-1]:6.3f} "
                     f"{t['forward_tokens'][-1] / 1e3:5.0f}k {t['backward_tokens'][-1] / 1e3:5.0f}k {wall:7.1f}")  # fmt: skip
    ct = c["traj"]
    lines.append(f"CAN wall: prepare {c['prepare_seconds']:.0f} s, DPO launch to step {ct['step'][1]} "
                 f"{ct['seconds'][1] - c['prepare_seconds']:.0f} s (Ray, torchrun, DeepSpeed start-up), then to the end "
                 f"(step {ct['step'][-1]}, saved) {ct['seconds'][-1] - ct['seconds'][1]:.0f} s")  # fmt: skip
    lines.append("models live: CAN dual step pi_ref + reward + safety (3), CAN training policy + reference (2); "
                 "baseline policy + reference + reward + safety (4; Safe-RLHF's PPO-Lagrangian: 6 with two critics)")
    summary = {"can": c, "baseline": configs, "lambda_exact": lam_opt, "floor": floor, "kl_ref_to_optimum": kl_ref, "ratios": {}}
    for k in criteria:
        for j, kind in enumerate(("first", "held")):
            mine = c["reach"][k][j]
            reached = {n: cfg["reach"][k][j] for n, cfg in configs.items() if cfg["reach"][k][j] is not None}
            if mine is None:
                continue
            if not reached:
                spent = max(cfg["traj"]["forward_tokens"][-1] for cfg in configs.values()) / c["traj"]["forward_tokens"][mine]
                lines.append(f"to {k} ({kind}): no baseline setting within {iterations} iterations ({spent:.2f}x CAN's forward tokens spent)")
                continue
            best = min(reached, key=lambda n: configs[n]["traj"]["forward_tokens"][reached[n]])
            ratio = {u: configs[best]["traj"][u][reached[best]] / c["traj"][u][mine] for u in ("forward_tokens", "backward_tokens", "seconds")}
            summary["ratios"][f"{k} {kind}"] = {"best": best, **ratio}
            lines.append(f"to {k} ({kind}): best baseline ({best}) / CAN = forward tokens {ratio['forward_tokens']:.2f}x, "
                         f"backward tokens {ratio['backward_tokens']:.2f}x, wall {ratio['seconds']:.2f}x")  # fmt: skip
    write_json(out / "primal_dual.json", summary)
    plot(c["traj"], configs, lam_opt, threshold, floor, out / "multiplier.png")
    print("\n".join(lines))
    print(f"wrote {out / 'primal_dual.json'} and {out / 'multiplier.png'}")


if __name__ == "__main__":
    main()
