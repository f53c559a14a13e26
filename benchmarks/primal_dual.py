"""CAN against an iterative primal-dual baseline on the toy world, side by side in one run.

    python benchmarks/primal_dual.py [--out benchmarks/out/primal_dual] [--quick]

CAN: the MoCAN demo pipeline (prepare with K = 128 reference samples per prompt, lambda* from the
dual, 3 epochs of OpenRLHF's DPO trainer on pseudo-preferences; torchrun, 2 ranks, ZeRO-2).
Baseline: Lagrangian policy-gradient in the style of Safe-RLHF's PPO-Lagrangian, on the same
fitted tiny reference: each iteration samples n responses for every prompt from the current
policy, rewards r + lambda_t g - beta (log pi - log pi_ref) per sequence, a per-prompt mean
baseline, PPO-clip updates (sequence-level ratio), then lambda_{t+1} = max(0, lambda_t + eta (b -
mean g)) from the batch's constraint violation. No critics (fewer models than Safe-RLHF's six).

Both are checked by exact enumeration after every iteration (not counted). Compute counts tokens
through the policy: forward tokens (generation: prompt prefill + each generated token; log-prob and
reference passes; training forwards) and backward tokens (training); the dual step's sampling is
CAN's only rollout. "Reached" = exact E[g] >= b - tol with tol = 0.1 (b - E_ref[g]) (the demo's
acceptance) AND KL(policy || exact optimum) <= the quality CAN reached, whichever iteration first
holds both; the constraint alone is reported too.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openrlhf_dual.artifacts import read_jsonl, write_json  # noqa: E402
from openrlhf_dual.demo import world as W  # noqa: E402
from openrlhf_dual.demo.steps import build_reference, dpo, exact_optimum  # noqa: E402


def can(out: Path, seed: int, threshold: float, beta: float) -> dict:
    """The MoCAN pipeline, timed per stage, with its token counts and exact result."""
    from transformers import AutoTokenizer

    from openrlhf_dual.prep import PrepConfig, run_prepare

    ref_dir, prompts = build_reference(out, 32, seed)
    t = time.perf_counter()
    sol = run_prepare(PrepConfig(
        prep_dir=str(out / "prep"), ref_model=str(ref_dir), prompt_dataset=str(out / "data" / "prompts.jsonl"),
        reward=f"file:{out / 'reward.py'}", safety=(f"file:{out / 'safety.py'},sign=+1",), thresholds=(threshold,),
        beta=beta, apply_chat_template=True, max_samples=32, n_samples=128, max_new_tokens=W.RESPONSE_LEN + 1,
        seed=seed, shard_size=16,
    ))  # fmt: skip
    prep_s = time.perf_counter() - t
    t = time.perf_counter()
    ckpt = dpo(out, "mocan", "openrlhf_dual.cli.train_dpo", ref_dir, beta, 3, ["--dual.algo", "mocan", "--dual.prep_dir", str(out / "prep")])
    train_s = time.perf_counter() - t

    tok = AutoTokenizer.from_pretrained(ref_dir)
    n_tok = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    heads = {p["prompt"]: n_tok(p["prompt"]) for p in read_jsonl(out / "prep" / "prompts.jsonl")}
    samples = [r["responses"] for f in sorted((out / "prep" / "samples").glob("*.jsonl")) for r in read_jsonl(f)]
    gen = sum(heads[p] * 128 + sum(len(s["token_ids"]) for s in per) for p, per in zip(heads, samples))
    pair_tokens = sum(2 * heads[r["prompt"]] + n_tok(r["chosen"]) + n_tok(r["rejected"]) + 2
                      for r in read_jsonl(out / "prep" / "pairs.jsonl"))  # fmt: skip
    ref = W.exact_policy(ref_dir, prompts)
    reward, safety = W.score_table(prompts)
    lam_opt, opt = exact_optimum(ref, reward, safety, threshold, beta)
    trained = W.exact_policy(ckpt, prompts)
    return {
        "lambda": sol["lam"][0], "lambda_exact": lam_opt, "safety": trained.expect(safety),
        "reward": trained.expect(reward), "kl_to_optimum": trained.kl(opt),
        "sampling_forward_tokens": gen, "update_forward_tokens": 3 * pair_tokens * 2, "update_backward_tokens": 3 * pair_tokens,
        "prepare_seconds": prep_s, "update_seconds": train_s, "models_live": {"dual step": 3, "training": 2},
    }  # fmt: skip


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


def primal_dual(ref_dir: Path, prompts: list[str], threshold: float, beta: float, lr: float, eta: float,
                iterations: int, n: int, exact: dict, seed: int) -> dict:  # fmt: skip
    """The baseline; per-iteration trajectories and cumulative token counts and seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(ref_dir)
    reference = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    policy = copy.deepcopy(reference).train()
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    reward, safety = exact["reward"], exact["safety"]
    lam, fwd, bwd, seconds = 0.0, 0, 0, 0.0
    traj = {k: [] for k in ("lambda", "safety", "reward", "kl_to_optimum", "forward_tokens", "backward_tokens", "seconds")}
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
                fwd, bwd = fwd + int(mask.sum()), bwd + int(mask.sum())
        mean_g = float(torch.cat([row[5] for row in rows]).mean())
        lam = max(0.0, lam + eta * (threshold - mean_g))
        seconds += time.perf_counter() - t
        policy.eval()
        now = W.exact_policy_of(policy, tok, prompts)
        for key, value in (("lambda", lam), ("safety", now.expect(safety)), ("reward", now.expect(reward)),
                           ("kl_to_optimum", now.kl(exact["optimum"])), ("forward_tokens", fwd),
                           ("backward_tokens", bwd), ("seconds", seconds)):  # fmt: skip
            traj[key].append(value)
    return traj


def first_reach(traj: dict, floor: float, kl_bound: float | None) -> int | None:
    """The first iteration (0-based) with exact safety >= floor (and KL to the optimum <= kl_bound)."""
    for i, (s, kl) in enumerate(zip(traj["safety"], traj["kl_to_optimum"])):
        if s >= floor and (kl_bound is None or kl <= kl_bound):
            return i
    return None


def plot(configs: dict, lam_opt: float, threshold: float, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2)
    for name, c in configs.items():
        ax.plot(c["traj"]["lambda"], label=name)
        ax2.plot(c["traj"]["safety"], label=name)
    ax.axhline(lam_opt, color="k", ls="--", label=f"exact lambda* = {lam_opt:.3f} (CAN solves it once)")
    ax2.axhline(threshold, color="darkorange", ls="--", label=f"threshold b = {threshold}")
    ax.set_xlabel("primal-dual iteration")
    ax.set_ylabel("multiplier lambda_t")
    ax.set_title("Primal-dual multiplier trajectories")
    ax2.set_xlabel("primal-dual iteration")
    ax2.set_ylabel("exact E[safety] of the policy")
    ax2.set_title("Constraint value while training")
    for a in (ax, ax2):
        a.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(str(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out/primal_dual")
    p.add_argument("--quick", action="store_true", help="one baseline setting, 10 iterations (smoke run)")
    p.add_argument("--iterations", type=int, default=40)
    a = p.parse_args()
    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    seed, threshold, beta, n = 0, 0.5, 0.5, 8
    print("CAN: prepare + one MoCAN run (the demo pipeline)", flush=True)
    c = can(out / "can", seed, threshold, beta)
    prompts = [r["raw"] for r in read_jsonl(out / "can" / "prep" / "prompts.jsonl")]
    ref_dir = out / "can" / "reference"
    reward, safety = W.score_table(prompts)
    ref = W.exact_policy(ref_dir, prompts)
    lam_opt, opt = exact_optimum(ref, reward, safety, threshold, beta)
    exact = {"reward": reward, "safety": safety, "optimum": opt}
    floor = threshold - 0.1 * (threshold - ref.expect(safety))
    grid = [(3e-3, 1.0)] if a.quick else [(1e-3, 0.2), (1e-3, 1.0), (3e-3, 0.2), (3e-3, 1.0)]
    iterations = 10 if a.quick else a.iterations
    configs = {}
    for lr, eta in grid:
        name = f"lr {lr:g}, eta {eta:g}"
        print(f"primal-dual {name}: {iterations} iterations", flush=True)
        traj = primal_dual(ref_dir, prompts, threshold, beta, lr, eta, iterations, n, exact, seed)
        hit = first_reach(traj, floor, c["kl_to_optimum"])
        configs[name] = {"lr": lr, "eta": eta, "traj": traj, "reach_constraint": first_reach(traj, floor, None),
                         "reach_quality": hit}  # fmt: skip
    can_fwd = c["sampling_forward_tokens"] + c["update_forward_tokens"]  # the dual step's sampling included
    can_s = c["prepare_seconds"] + c["update_seconds"]
    lines = [f"toy world, seed {seed}, b = {threshold}, beta = {beta}; constraint tolerance E[g] >= {floor:.3f}; "
             f"quality = also KL(policy || exact optimum) <= {c['kl_to_optimum']:.4f} (CAN's)",
             f"{'method':24s} {'fwd tokens':>10s} {'bwd tokens':>10s} {'seconds':>8s} {'reached at':>10s} {'E[g]':>7s} "
             f"{'KL(opt)':>8s} {'lambda':>7s} {'quality at':>10s}",
             f"{'CAN: dual step + MoCAN':24s} {can_fwd:10d} {c['update_backward_tokens']:10d} {can_s:8.1f} {'once':>10s} "
             f"{c['safety']:7.3f} {c['kl_to_optimum']:8.4f} {c['lambda']:7.3f} {'once':>10s}"]  # fmt: skip
    best, summary = None, {"can": c, "baseline": configs, "lambda_exact": lam_opt, "floor": floor}
    for name, cfg in configs.items():
        i, q, t = cfg["reach_constraint"], cfg["reach_quality"], cfg["traj"]
        j = i if i is not None else len(t["safety"]) - 1
        lines.append(f"{'PD ' + name:24s} {t['forward_tokens'][j]:10d} {t['backward_tokens'][j]:10d} {t['seconds'][j]:8.1f} "
                     f"{(f'iter {i + 1}' if i is not None else 'not'):>10s} {t['safety'][j]:7.3f} {t['kl_to_optimum'][j]:8.4f} "
                     f"{t['lambda'][j]:7.3f} {(f'iter {q + 1}' if q is not None else 'not'):>10s}")  # fmt: skip
        if i is not None and (best is None or t["forward_tokens"][i] < configs[best]["traj"]["forward_tokens"][configs[best]["reach_constraint"]]):
            best = name
    lines.append(f"(rows: at the iteration the constraint was reached, else the last; {iterations} iterations max; "
                 f"exact lambda* = {lam_opt:.4f}, CAN's from samples = {c['lambda']:.4f})")  # fmt: skip
    lines.append("models live: CAN dual step pi_ref + reward + safety (3), CAN training policy + reference (2); "
                 "baseline policy + reference + reward + safety (4; Safe-RLHF's PPO-Lagrangian: 6 with two critics)")
    if best is not None:
        t, i = configs[best]["traj"], configs[best]["reach_constraint"]
        summary.update(best=best, ratio_forward_tokens=t["forward_tokens"][i] / can_fwd,
                       ratio_backward_tokens=t["backward_tokens"][i] / c["update_backward_tokens"],
                       ratio_seconds=t["seconds"][i] / can_s)  # fmt: skip
        lines.append(f"best baseline to the constraint tolerance ({best}) / CAN: forward tokens "
                     f"{summary['ratio_forward_tokens']:.2f}x, backward tokens {summary['ratio_backward_tokens']:.2f}x, "
                     f"wall {summary['ratio_seconds']:.2f}x (CAN's wall: Ray + torchrun + DeepSpeed start-up included)")  # fmt: skip
    else:
        most = max(cfg["traj"]["forward_tokens"][-1] for cfg in configs.values())
        lines.append(f"no baseline setting reached the tolerance in {iterations} iterations ({most / can_fwd:.2f}x CAN's forward tokens spent)")
    write_json(out / "primal_dual.json", summary)
    plot(configs, lam_opt, threshold, out / "multiplier.png")
    print("\n".join(lines))
    print(f"wrote {out / 'primal_dual.json'} and {out / 'multiplier.png'}")


if __name__ == "__main__":
    main()
