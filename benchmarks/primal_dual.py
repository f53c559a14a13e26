"""CAN against an iterative primal-dual baseline on the toy world, side by side in one run.

    python benchmarks/primal_dual.py [--out benchmarks/out/primal_dual] [--quick] [--iterations N]

CAN: the MoCAN demo pipeline (prepare with K = 128 reference samples per prompt, lambda* from the
dual), then its default primal step (the dual-weighted likelihood of prepare's samples, OpenRLHF's
SFT trainer) and, on the same prep directory, the paper's DPO on pseudo-preferences (OpenRLHF's DPO
trainer); torchrun, 2 ranks, ZeRO-2; an HF checkpoint every few optimizer steps so each trajectory
is measured like the baseline's. The headline compares the baseline with CAN's default.
Baseline: Lagrangian policy-gradient in the style of Safe-RLHF's PPO-Lagrangian, on the same
fitted tiny reference: each iteration samples n responses for every prompt from the current
policy, rewards r + lambda_t g - beta (log pi - log pi_ref) per sequence, a per-prompt mean
baseline, PPO-clip updates (sequence-level ratio), then lambda_{t+1} = max(0, lambda_t + eta (b -
mean g)) from the batch's constraint violation. No critics (fewer models than Safe-RLHF's six).
Tuning grid: Adam lr {1e-3, 3e-3} x multiplier step eta {0.05, 0.2, 1}, constant lr or OpenRLHF's
default cosine decay to 0.1 lr over the run (eight settings; the quick run does one).

Every baseline iteration and every CAN checkpoint is evaluated exactly (not counted) on the WHOLE
response distribution (openrlhf_dual.demo.exact: every response up to the generation cap, on the
world's set or not, the optimum pi_lambda* over the same space), conservatively: the lower bound of
E[g], the upper bound of KL(policy || optimum), against the lower bound of KL(ref || optimum).
Compute counts tokens through the policy: forward tokens (generation: prompt prefill + each
generated token; log-prob and reference passes; training forwards) and backward tokens
(training); CAN's dual-step sampling is counted as its rollout, its training tokens pro rata to
the optimizer steps done. Three criteria, each with the first point that meets it and the point
from which every later one does ("held": a run whose last point misses it has no held point):
  tolerance: E[g] >= b - tol, tol = 0.1 (b - E_ref[g]) (the demo's acceptance);
  optimum:   tolerance and KL(policy || optimum) <= 0.05 KL(ref || optimum) (the demo's acceptance);
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
from types import SimpleNamespace
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openrlhf_dual.artifacts import read_jsonl, write_json  # noqa: E402
from openrlhf_dual.demo import world as W  # noqa: E402
from openrlhf_dual.demo.exact import ToyJudge  # noqa: E402
from openrlhf_dual.demo.steps import DPO_BATCH, EPOCHS, LIKELIHOOD_BATCH, build_reference, prepare, primal_step  # noqa: E402

POINT = ("lambda", "safety", "reward", "kl_to_optimum", "mass_on_set", "kl_renormalised", "forward_tokens",
         "backward_tokens")  # fmt: skip
LABELS = {"likelihood": "CAN (dual step + weighted likelihood)", "dpo": "CAN, paper's DPO (dual step + DPO)"}


def judged(view: dict) -> dict:
    """The numbers a trajectory point keeps: conservative whole-distribution bounds, and the
    renormalised KL beside them."""
    w = view["whole"]
    return {"safety": w["achieved"]["safety"][0][0], "reward": sum(w["achieved"]["reward"]) / 2,
            "kl_to_optimum": w["kl_to_optimum"][1], "mass_on_set": w["achieved"]["mass_on_set"][0],
            "kl_renormalised": view["renormalised"]["kl_to_optimum"]}  # fmt: skip


def dual_step(out: Path, ref_dir: Path, seed: int, threshold: float, beta: float) -> tuple[dict, float, int]:
    """prepare on the world's prompts: (dual.json, seconds, generation tokens: prefill + generated)."""
    from transformers import AutoTokenizer

    t = time.perf_counter()
    sol = prepare(out, ref_dir, f"file:{out / 'reward.py'}", f"file:{out / 'safety.py'},sign=+1", threshold, beta, 32, 128, seed)
    seconds = time.perf_counter() - t
    tok = AutoTokenizer.from_pretrained(ref_dir)
    heads = [len(tok(p["prompt"], add_special_tokens=False)["input_ids"]) for p in read_jsonl(out / "prep" / "prompts.jsonl")]
    samples = [r["responses"] for f in sorted((out / "prep" / "samples").glob("*.jsonl")) for r in read_jsonl(f)]
    gen = sum(h * len(per) + sum(len(s["token_ids"]) for s in per) for h, per in zip(heads, samples))
    return sol, seconds, gen


def can(out: Path, objective: str, ref_dir: Path, beta: float, sol: dict, prep_s: float, gen: int, every: int,
        exact: Callable[[str | Path], dict]) -> dict:  # fmt: skip
    """One primal step on out/prep, timed; its trajectory (the reference, then a checkpoint every
    `every` optimizer steps and the final model) with cumulative token counts and exact results.
    Tokens per optimizer step: likelihood, the samples' prompt + response tokens (policy forward and
    backward); DPO, chosen + rejected tokens (policy and reference forward, policy backward)."""
    from transformers import AutoTokenizer

    name = f"mocan-{objective}"
    epochs = EPOCHS[objective]
    launched = time.time()
    steps_dir = out / f"steps-{objective}"
    extra = ["--ckpt.save_steps", str(every), "--ckpt.save_hf", "--ckpt.disable_ds", "--ckpt.path", str(steps_dir)]
    a = SimpleNamespace(objective=objective, epochs=epochs, anchor=0.0, beta=beta)
    ckpt = primal_step(out, name, a, ref_dir, "mocan", extra)
    train_s = time.time() - launched
    walls = step_walls(out / "tensorboard" / name, launched)

    tok = AutoTokenizer.from_pretrained(ref_dir)
    n_tok = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    heads = {p["prompt"]: n_tok(p["prompt"]) for p in read_jsonl(out / "prep" / "prompts.jsonl")}
    if objective == "likelihood":
        samples = [r["responses"] for f in sorted((out / "prep" / "samples").glob("*.jsonl")) for r in read_jsonl(f)]
        tokens = sum(h * len(per) + sum(len(s["token_ids"]) for s in per) for h, per in zip(heads.values(), samples))
        steps_per_epoch = sum(len(per) for per in samples) // LIKELIHOOD_BATCH
        per_step, passes = tokens / steps_per_epoch, 1
    else:
        pairs = list(read_jsonl(out / "prep" / "pairs.jsonl"))
        tokens = sum(2 * heads[r["prompt"]] + n_tok(r["chosen"]) + n_tok(r["rejected"]) + 2 for r in pairs)
        steps_per_epoch = len(pairs) // DPO_BATCH
        per_step, passes = tokens / steps_per_epoch, 2
    points = [(0, ref_dir)] + sorted((int(re.search(r"global_step(\d+)_hf", d.name)[1]), d) for d in steps_dir.glob("global_step*_hf"))
    last = epochs * steps_per_epoch
    if points[-1][0] != last:
        points.append((last, ckpt))
    walls[last] = train_s
    traj = {k: [] for k in (*POINT, "seconds", "step")}
    for step, path in points:
        counts = {"lambda": sol["lam"][0], "forward_tokens": gen + round(passes * per_step * step),
                  "backward_tokens": round(per_step * step), "seconds": prep_s + (walls[step] if step else 0.0),
                  "step": step}  # fmt: skip
        for key, value in {**exact(path), **counts}.items():
            traj[key].append(value)
    shutil.rmtree(steps_dir)
    return {"lambda": sol["lam"][0], "traj": traj, "prepare_seconds": prep_s, "update_seconds": train_s,
            "models_live": {"dual step": 3, "training": passes}}  # fmt: skip


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
                iterations: int, n: int, exact: Callable, seed: int) -> dict:  # fmt: skip
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
        now = exact(policy)
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


def plot(cans: dict, configs: dict, lam_opt: float, threshold: float, floor: float, path: Path) -> None:
    """Multiplier, E[g] and KL to the optimum (whole distribution) against forward tokens, CAN beside the baseline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 5.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    k = lambda t: [x / 1e3 for x in t["forward_tokens"]]  # noqa: E731
    keys = ("lambda", "safety", "kl_to_optimum")
    for name, c in configs.items():
        for ax, key in zip(axes, keys):
            ax.plot(k(c["traj"]), c["traj"][key], lw=1, ls="--" if c["schedule"] != "constant" else "-",
                    label=f"primal-dual {name}")
    for (objective, c), style in zip(cans.items(), ("k.-", "s-")):
        for ax, key in zip(axes, keys):
            ax.plot(k(c["traj"]), c["traj"][key], style, lw=2, ms=3, color="black" if objective == "likelihood" else "gray",
                    label=LABELS[objective])
    for ax in axes:
        ax.set_xlabel("policy forward tokens [thousands]")
    methods = axes[0].get_legend_handles_labels()
    axes[0].axhline(lam_opt, color="gray", ls=":", label=f"exact lambda* = {lam_opt:.3f}")
    axes[0].set_ylabel("multiplier lambda")
    axes[0].set_title("Multiplier: primal-dual iterates it, CAN solves it once")
    axes[1].axhline(threshold, color="darkorange", ls="--", label=f"threshold b = {threshold}")
    axes[1].axhline(floor, color="darkorange", ls=":", label=f"tolerance: E[g] >= {floor:.3f}")
    axes[1].set_ylabel("E[safety] of the policy (whole distribution, lower bound)")
    axes[1].set_title("Constraint value while training")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("KL(policy || constrained optimum) [nats] (whole, upper bound)")
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
    judge = ToyJudge(ref_dir, prompts, threshold, beta)
    exact = lambda m: judged(judge.evaluate_dir(m) if isinstance(m, (str, Path)) else judge.evaluate(m))  # noqa: E731
    lam_opt = judge.lam[0]
    ref_g, kl_ref = judge.reference["safety"][0][1], judge.optimum["kl_ref_to_optimum"][0]
    floor = threshold - 0.1 * (threshold - ref_g)
    print("CAN: prepare, then the weighted-likelihood primal step and the paper's DPO on the same prep directory", flush=True)
    sol, prep_s, gen = dual_step(out / "can", ref_dir, seed, threshold, beta)
    cans = {objective: can(out / "can", objective, ref_dir, beta, sol, prep_s, gen, every, exact)
            for objective, every in (("likelihood", 4), ("dpo", 4))}  # fmt: skip
    c = cans["likelihood"]
    can_kl = c["traj"]["kl_to_optimum"][-1]
    criteria = {
        "tolerance": lambda s, kl: s >= floor,
        "optimum": lambda s, kl: s >= floor and kl <= 0.05 * kl_ref,
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
    for cc in cans.values():
        cc["reach"] = {k: reach(cc["traj"], ok) for k, ok in criteria.items()}

    lines = [f"toy world, seed {seed}, b = {threshold}, beta = {beta}, exact lambda* = {lam_opt:.4f} (whole distribution); "
             f"forward tokens (thousands) to each criterion, first / held to the end of the run ('-': never):",
             f"  tolerance: E[g] >= {floor:.3f};  optimum: and KL(pi || opt) <= {0.05 * kl_ref:.3f} (0.05 KL(ref || opt));  "
             f"CAN final: and KL(pi || opt) <= {can_kl:.4f}",
             f"{'method':38s} {'tolerance':>15s} {'optimum':>15s} {'CAN final':>15s} {'end: E[g]':>9s} {'KL(opt)':>8s} "
             f"{'on set':>7s} {'lambda':>6s} {'fwd':>6s} {'bwd':>6s} {'wall s':>7s}"]  # fmt: skip
    rows = {LABELS[o]: (cc, cc["prepare_seconds"] + cc["update_seconds"]) for o, cc in cans.items()}
    rows.update({f"PD {name}": (cfg, cfg["traj"]["seconds"][-1]) for name, cfg in configs.items()})
    for name, (r, wall) in rows.items():
        t = r["traj"]
        lines.append(f"{name:38s} " + " ".join(f"{fmt_reach(t, r['reach'][k]):>15s}" for k in criteria)
                     + f" {t['safety'][-1]:9.3f} {t['kl_to_optimum'][-1]:8.4f} {t['mass_on_set'][-1]:7.2%} {t['lambda'][-1]:6.3f} "
                     f"{t['forward_tokens'][-1] / 1e3:5.0f}k {t['backward_tokens'][-1] / 1e3:5.0f}k {wall:7.1f}")  # fmt: skip
    for objective, cc in cans.items():
        ct = cc["traj"]
        lines.append(f"{LABELS[objective]} wall: prepare {cc['prepare_seconds']:.0f} s, launch to step {ct['step'][1]} "
                     f"{ct['seconds'][1] - cc['prepare_seconds']:.0f} s (Ray, torchrun, DeepSpeed start-up), then to the end "
                     f"(step {ct['step'][-1]}, saved) {ct['seconds'][-1] - ct['seconds'][1]:.0f} s; final KL renormalised "
                     f"to the world's 64 responses {ct['kl_renormalised'][-1]:.4f}")  # fmt: skip
    lines.append("models live: CAN dual step pi_ref + reward + safety (3), CAN training: weighted likelihood the policy (1), "
                 "DPO policy + reference (2); baseline policy + reference + reward + safety (4; Safe-RLHF's "
                 "PPO-Lagrangian: 6 with two critics)")  # fmt: skip
    summary = {"can": c, "can_dpo": cans["dpo"], "baseline": configs, "lambda_exact": lam_opt, "floor": floor,
               "kl_ref_to_optimum": kl_ref, "ratios": {}}  # fmt: skip
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
    plot(cans, configs, lam_opt, threshold, floor, out / "multiplier.png")
    print("\n".join(lines))
    print(f"wrote {out / 'primal_dual.json'} and {out / 'multiplier.png'}")


if __name__ == "__main__":
    main()
