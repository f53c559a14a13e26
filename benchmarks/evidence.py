"""Regenerate README's "Does it work?" section from fresh runs (what `make evidence` does):

    python benchmarks/evidence.py [--out evidence_out]

1. the MoCAN demo with its default primal step (weighted likelihood) and with the paper's DPO, and
   the PeCAN demo (default primal step), on the toy world (exact optimum known; every number on
   the whole response distribution, the renormalised KL beside it), and the one-shot PPO demo (in
   the vLLM environment: make install-vllm);
2. a lambda sweep with recipes/lambda_sweep.sh (default primal step) on the MoCAN demo's prep
   directory, evaluated on held-out toy prompts by `openrlhf_dual.cli.evaluate` (one picture);
3. benchmarks/primal_dual.py (CAN against a tuned primal-dual baseline, multiplier trajectory);
4. benchmarks/trainer_overhead.py, benchmarks/dual_solver.py and benchmarks/logprob.py;
5. calibration rounds (demo --calibrate) on the PeCAN demo and on MoCAN with two weak trainers;
6. mutation/summary.json as `make mutation` last wrote it (not rerun: `--mutation-only` refreshes
   just that paragraph of README.md).
Pictures go to docs/evidence/, numbers into README.md between the evidence markers. Takes about
40 minutes on 2 CPU cores. A rerun with the same --out resumes: finished steps are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from openrlhf_dual.demo.steps import EPOCHS, LIKELIHOOD_BATCH, LIKELIHOOD_LR  # noqa: E402

START, END = "<!-- evidence:start -->", "<!-- evidence:end -->"
MUT_START, MUT_END = "<!-- mutation:start -->", "<!-- mutation:end -->"


def run(cmd: list[str], env: dict | None = None) -> str:
    """Run a command from the repository root; its stdout, or exit with its tail."""
    from openrlhf_dual.launch import cpu_env

    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env={**cpu_env(), **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


DEMOS = {  # name: (demo flags, README label)
    "mocan": (["--algo", "mocan"], "MoCAN, weighted likelihood (default)"),
    "mocan-dpo": (["--algo", "mocan", "--objective", "dpo"], "MoCAN, paper's DPO"),
    "pecan": (["--algo", "pecan"], "PeCAN, weighted likelihood (default)"),
}


def demo_row(name: str, r: dict) -> str:
    """One demo on the whole distribution: conservative bounds (safety: lower; KL(trained || opt):
    upper; KL(ref || opt): lower), midpoints where the bounds are tight, the renormalised KL beside."""
    w = r["whole"]
    got, opt, ref = w["achieved"], w["optimum"], w["reference"]
    mid = lambda x: sum(x) / 2  # noqa: E731
    return (f"| {name} | {r['threshold']:+.2f} | {mid(ref['safety'][0]):+.3f} | {got['safety'][0][0]:+.3f} | "
            f"{mid(opt['safety'][0]):+.3f} | {r['lambda'][0]:.3f} / {opt['lambda'][0]:.3f} | {mid(got['reward']):+.3f} / "
            f"{mid(opt['reward']):+.3f} | {got['mass_on_set'][0]:.1%} / {mid(opt['mass_on_set']):.1%} | "
            f"{w['kl_to_optimum'][1]:.4f} / {w['kl_ref_to_optimum'][0]:.3f} | {r['renormalised']['kl_to_optimum']:.4f} | "
            f"{r['seconds']:.0f} s |")  # fmt: skip


def ppo_part(out: Path) -> tuple[str, str]:
    """One-shot PPO's row for the demo table (the demos' columns) and its compute, from `python -m
    openrlhf_dual.demo --algo ppo` (run with the vLLM environment's Python, VLLM_PYTHON or
    .venv-vllm/bin/python, unless out/ppo/report.json exists)."""
    if not (out / "ppo" / "report.json").exists():
        vllm_python = os.environ.get("VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
        run([vllm_python, "-m", "openrlhf_dual.demo", "--algo", "ppo", "--out", str(out / "ppo")])
    r = json.loads((out / "ppo" / "report.json").read_text())
    ppo = r["ppo"]
    row = demo_row(f"one-shot PPO ({r['estimator']})", r)
    text = (f"One-shot PPO is OpenRLHF's own `train_ppo_ray` on r + lambda*.g (`--dual.prep_dir`), KL coefficient "
            f"beta, k1 in the reward; vLLM's CPU build and Ray with logical GPUs, weights synced over gloo "
            f"(patches/0004). It spent {ppo['steps']} rollouts of {ppo['samples'] // max(ppo['steps'], 1)} responses "
            f"({ppo['samples']} samples, {ppo['response_tokens']} response tokens) in {ppo['seconds']:.0f} s of "
            f"train_ppo_ray (start-up included); its reference is the same world's with hidden 64 (vLLM's CPU "
            f"attention needs head_dim >= 32), so its numbers are its own. Evaluated over its whole response "
            f"distribution (mass off the 64 responses included; unseen mass <= {r['whole']['unseen']['policy']:.1e}).")  # fmt: skip
    return row, text


# calibration rounds (openrlhf_dual.demo.calibrated): name -> (the demo's flags, README label); "pecan" continues the
# PeCAN demo above; "mocan-weak" and "mocan-dpo1" are MoCAN with deliberately weak trainers (one epoch of the weighted
# likelihood; one epoch of the paper's DPO, whose rounds relabel the same pairs)
CALIBRATED = {
    "pecan": (["--algo", "pecan"], "PeCAN (default seed and trainer)"),
    "mocan-weak": (["--algo", "mocan", "--epochs", "1"], "MoCAN, weak trainer (1 epoch instead of 2)"),
    "mocan-dpo1": (["--algo", "mocan", "--objective", "dpo", "--epochs", "1"], "MoCAN, paper's DPO, 1 epoch instead of 3"),
}
ROUNDS = 2


def calibration_rows(label: str, done: dict) -> str:
    """One table row per round of calibration.json: the constraint's value on the whole
    distribution (lower bound), its miss and violation against b, reward, KL to the optimum,
    the certificate and the compute spent so far."""
    b, ref = done["thresholds"][0], done["reference_safety"][0]
    rows, spent = [], done["one_shot_seconds"]
    for e in done["rounds"]:
        spent += e["train_seconds"] or 0.0
        what = "one shot" if e["round"] == 0 else f"round {e['round']}"
        runs = "prepare + 1 training run" if e["round"] == 0 else f"+{e['round']} training run{'s' * (e['round'] > 1)}"
        rows.append(f"| {label} | {what} | {e['lambda'][0]:.3f} | {e['safety'][0][0]:+.4f} | {e['miss'][0]:.4f} | "
                    f"{e['violation'][0]:.4f} ({e['violation'][0] / (b - ref):.1%}) | {sum(e['reward']) / 2:+.4f} | "
                    f"{e['kl_to_optimum'][1]:.4f} / {e['kl_ref_to_optimum'][0]:.3f} | "
                    f"{'yes' if e['certified'] else 'no'} | {runs}, {spent:.0f} s |")  # fmt: skip
    return "\n".join(rows)


def calibration_part(out: Path) -> str:
    """README's calibration paragraph and table from the CALIBRATED runs' calibration.json."""
    done = {name: json.loads((out / name / "calibration.json").read_text()) for name in CALIBRATED}
    rows = "\n".join(calibration_rows(label, done[name]) for name, (_, label) in CALIBRATED.items())
    b = done["pecan"]["thresholds"][0]
    gist = "; ".join(f"{label}: {d['rounds'][0]['miss'][0]:.4f} to {d['rounds'][1]['miss'][0]:.4f} "
                     f"({d['rounds'][1]['miss'][0] / d['rounds'][0]['miss'][0]:.0%} of the one-shot miss)"
                     for name, (_, label) in CALIBRATED.items() for d in [done[name]])  # fmt: skip
    certified = [label for name, (_, label) in CALIBRATED.items() if done[name]["rounds"][0]["certified"]]
    kl = "; ".join(f"{label}: " + " -> ".join(f"{e['kl_to_optimum'][1]:.3f}" for e in done[name]["rounds"])
                   for name, (_, label) in CALIBRATED.items())  # fmt: skip
    return f"""**When one shot misses: calibration rounds** (`python -m openrlhf_dual.demo ... --calibrate {ROUNDS}`,
openrlhf_dual/demo/calibrated.py; what recipes/calibrated.sh does with `openrlhf_dual.cli.calibrate`).
Each round re-solves the dual on the same prep directory for the threshold corrected by the
measured miss (no new samples of pi_ref: only the weights change), retrains with the same trainer
at the new lambda and measures the result exactly on the whole distribution; that measurement is
fed back (its interval's lower bound is the certificate's). Certified: achieved safety (lower bound)
>= b - 5% of the gap b - E_ref[g]. b = {b}; violation is max(0, b - E[g]), its share of the gap in
brackets; compute is the one-shot demo's wall time (reference, pre-alignment for PeCAN, prepare,
training, exact evaluation) plus each round's training. One round took abs(E[g] - b) (midpoints) from
{gist}.
At this tolerance {len(certified)} of the {len(CALIBRATED)} one-shot runs were already certified
({"; ".join(certified) or "none"}): the rounds shrink the miss, they were not needed to pass
the certificate. A round corrects the constraint, not the trainer: KL(trained || optimum) by
round, {kl}.

| case | run | lambda | safety E[g] (lower bound) | abs(E[g] - b) | violation | reward | KL(trained‖opt) (upper bound) / KL(ref‖opt) (lower bound), whole | certified | compute so far |
|---|---|---|---|---|---|---|---|---|---|
{rows}

![achieved safety by calibration round](docs/evidence/calibration_pecan.png)
![achieved safety by calibration round, weak trainer](docs/evidence/calibration_mocan_weak.png)
![achieved safety by calibration round, paper's DPO for one epoch](docs/evidence/calibration_mocan_dpo1.png)"""


def pd_headline(pd: dict) -> str:
    """The primal-dual comparison in words, from benchmarks/primal_dual.py's summary JSON."""
    can, base, ratios = pd["can"], pd["baseline"], pd["ratios"]

    def versus(criterion: str) -> str:  # to the criterion, held to the end of the run
        if f"{criterion} held" in ratios:
            r = ratios[f"{criterion} held"]
            return (f"the best baseline setting ({r['best']}) spent {r['forward_tokens']:.1f}x CAN's forward tokens, "
                    f"{r['backward_tokens']:.1f}x its backward tokens and {r['seconds']:.1f}x its wall time")  # fmt: skip
        if can["reach"][criterion][1] is None:
            return "CAN itself did not hold it to the end of its run"
        spent = max(b["traj"]["forward_tokens"][-1] for b in base.values())
        ratio = spent / can["traj"]["forward_tokens"][can["reach"][criterion][1]]
        return f"no baseline setting got there within its run ({ratio:.1f}x CAN's forward tokens)"

    text = (f"To meet the constraint tolerance and keep meeting it to the end of the run (what a user who stops "
            f"the run gets), {versus('tolerance')}. The first touch of the tolerance, which only an oracle could "
            f"stop at, ")  # fmt: skip
    first = ratios.get("tolerance first")
    if first:
        end = base[first["best"]]["traj"]["safety"][-1]
        text += (f"came at {first['forward_tokens']:.2f}x CAN's forward tokens for the best baseline setting "
                 f"({first['best']}; it ends its run at E[g] = {end:.3f}, tolerance {pd['floor']:.3f}). ")  # fmt: skip
    else:
        text += "never came for the baseline. "
    return (text + f"To within 0.05 KL(ref || optimum) of the optimum and staying there, {versus('optimum')}; "
            f"to CAN's final distance to the optimum, {versus('CAN final')}.")


def mutation_paragraph() -> str:
    """README's paragraph on mutation testing, from mutation/summary.json (written by `make
    mutation`; not rerun here), between its own markers so `--mutation-only` can refresh it alone."""
    path = ROOT / "mutation" / "summary.json"
    if not path.exists():
        return f"{MUT_START}\n{MUT_END}"
    s = json.loads(path.read_text())
    t = s["total"]
    per = ", ".join(f"{Path(m).stem} {v['killed']}/{v['mutants'] - v['equivalent']}" for m, v in s["modules"].items())
    return f"""{MUT_START}
**The tests fail when the code is wrong** (`{s['command']}`, {s['tool']}, {s['date']}: every function of
the dual, the labels, the pairs, the evaluation statistics and the Safe-RLHF normaliser mutated, the
fast tests run against each mutant): {t['killed']} of {t['mutants'] - t['equivalent']} non-equivalent mutants
killed ({t['score']:.1%}); {t['equivalent']} more are listed in mutation/EQUIVALENT.md, each with why no test can
tell it from the code (the same computation written differently, ties of probability zero, a
budget no input reaches). Killed / non-equivalent per module: {per}.
{MUT_END}"""


def section(out: Path, outputs: dict) -> str:
    from openrlhf_dual.evaluation import markdown

    reports = {name: json.loads((out / name / "report.json").read_text()) for name in DEMOS}
    pre = reports["pecan"]["renormalised"]["pre_alignment"]
    sweep = json.loads((out / "sweep" / "eval" / "report.json").read_text())
    sweep_md = markdown(sweep, root=ROOT).split("\n", 2)[2]  # paths relative to the repository
    pd = json.loads((out / "primal_dual" / "primal_dual.json").read_text())
    ppo_row, ppo_text = ppo_part(out)
    printout = outputs["primal_dual"][outputs["primal_dual"].index("toy world") :].splitlines()
    pd_table = "\n".join(line for line in printout if not line.startswith("wrote "))
    rows = "\n".join(demo_row(label, reports[name]) for name, (_, label) in DEMOS.items())
    dpo = reports["mocan-dpo"]["whole"]
    return f"""{START}
## Does it work?

Generated by `make evidence` (benchmarks/evidence.py) on this machine: 2 CPU cores, no GPU. The
toy world (openrlhf_dual/demo/world.py) is small enough to enumerate, so the constrained optimum
and every trained policy are evaluated exactly, on the **whole** response distribution: every
response up to the generation cap (the world's 3 words and EOS), on the world's 64 responses or
not, scored by the world's own functions, with pi_lambda* and lambda* defined over the same space
(openrlhf_dual/demo/exact.py; the part of the tree below probability 1e-6 is bounded, not
ignored: safety is the lower bound, KL(trained‖opt) the upper bound, KL(ref‖opt) the lower one).

**One-shot alignment lands on the constrained optimum** (demos, default settings: 32 prompts,
K = 128, beta = 0.5, OpenRLHF's trainers under torchrun, 2 ranks ZeRO-2; weighted likelihood:
{EPOCHS['likelihood']} epochs of OpenRLHF's SFT trainer on prepare's samples; paper's DPO: {EPOCHS['dpo']} epochs of its DPO trainer):

| demo | threshold b | reference safety | achieved (lower bound) | exact optimum | lambda (samples / exact) | reward (achieved / optimum) | mass on the 64 responses (trained / optimum) | KL(trained‖opt) / KL(ref‖opt), whole | KL(trained‖opt) renormalised | wall |
|---|---|---|---|---|---|---|---|---|---|---|
{rows}
{ppo_row}

{ppo_text}

The paper's DPO matches pi_lambda*'s ratios within the world's 64 responses (the renormalised KL)
but not the mass: it put {1 - dpo['achieved']['mass_on_set'][0]:.1%} of its mass on other responses (worst prompt
{1 - dpo['achieved']['mass_on_set_min_prompt']:.1%}), which DPO's loss, a function of log-ratio differences within pairs, cannot
see. PeCAN starts from preference data only (two pre-alignment DPO runs). On the 64 responses,
pre-alignment accounts for KL {pre['kl_exact_target_to_optimum']:.4f} of its gap (PeCAN's exact answer on the pre-aligned
models' implicit rewards, against the optimum; its safety {pre['exact_target']['safety'][0]:+.3f}), the rest
(sampling, dual, training) for KL {pre['kl_trained_to_exact_target']:.4f} against that answer.

![MoCAN frontier](docs/evidence/frontier.png)

**CAN against primal-dual** (benchmarks/primal_dual.py, side by side in one run; a Lagrangian
policy-gradient baseline in the style of Safe-RLHF's PPO-Lagrangian on the same tiny reference,
tuned over {len(pd['baseline'])} settings; CAN's training checkpointed every 4 optimizer steps; every point
evaluated exactly on the whole distribution). {pd_headline(pd)}

```
{pd_table}
```

![multiplier trajectory](docs/evidence/multiplier.png)

**A lambda sweep, evaluated** (recipes/lambda_sweep.sh with the default primal step: one prepare,
one run per lambda, one `openrlhf_dual.cli.evaluate` on held-out toy prompts, which samples the
policies, so it sees every response; 95% intervals over prompts):

{sweep_md.strip()}

![lambda sweep on the helpfulness/safety plane](docs/evidence/sweep_plane.png)

**Training cost per step** (benchmarks/trainer_overhead.py, each objective against stock DPO):

```
{outputs['trainer_overhead'].strip()}
```

**The dual step is cheap and right** (benchmarks/dual_solver.py; our Newton solver against SciPy's
L-BFGS-B and the authors' projected gradient descent):

```
{outputs['dual_solver'].strip()}
```

**PeCAN's log-prob scoring** (benchmarks/logprob.py):

```
{outputs['logprob'].strip()}
```

{calibration_part(out)}

{mutation_paragraph()}
{END}"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="evidence_out")
    p.add_argument("--mutation-only", action="store_true", help="refresh only the mutation paragraph (after make mutation)")
    a = p.parse_args()
    if a.mutation_only:
        readme = (ROOT / "README.md").read_text()
        head, rest = readme.split(MUT_START, 1)
        (ROOT / "README.md").write_text(head + mutation_paragraph() + rest.split(MUT_END, 1)[1])
        return
    out = (ROOT / a.out).resolve()
    py = sys.executable
    for name, (flags, _) in DEMOS.items():
        if not (out / name / "report.json").exists():
            run([py, "-m", "openrlhf_dual.demo", *flags, "--out", str(out / name)])

    for name, (flags, _) in CALIBRATED.items():  # continues the demo in out/name (pecan: the one above)
        done = out / name / "calibration.json"
        if not done.exists() or len(json.loads(done.read_text())["rounds"]) <= ROUNDS:
            run([py, "-m", "openrlhf_dual.demo", *flags, "--out", str(out / name), "--calibrate", str(ROUNDS)])

    from openrlhf_dual.artifacts import write_jsonl
    from openrlhf_dual.launch import torchrun_launcher
    from openrlhf_dual.demo import world as W

    trained_on = set(W.make_prompts(32, 0))
    write_jsonl(out / "heldout.jsonl", [{"input": x} for x in W.make_prompts(60, 99) if x not in trained_on][:24])
    demo_train = (f"--ds.zero_stage 2 --ds.attn_implementation eager --ds.param_dtype bf16 --train.micro_batch_size "
                  f"{LIKELIHOOD_BATCH // 2} --train.batch_size {LIKELIHOOD_BATCH} --train.max_epochs {EPOCHS['likelihood']} "
                  f"--adam.lr {LIKELIHOOD_LR} --lr_warmup_ratio 0.05 --data.max_len 64")  # the demo's primal step
    if not (out / "sweep" / "eval" / "report.md").exists():
        run(["bash", "recipes/lambda_sweep.sh"], env={
            "REF": str(out / "mocan" / "reference"), "PREP": str(out / "mocan" / "prep"), "OUT": str(out / "sweep"),
            "HELDOUT": str(out / "heldout.jsonl"), "HELDOUT_SPLIT": "train", "N_HELDOUT": "24", "K_EVAL": "8",
            "BETA": "0.5", "LAMBDAS": "0 0.5 star 2", "OBJECTIVE": "likelihood", "LAUNCH": " ".join([*torchrun_launcher(2), "-m"]),
            "TRAIN_FLAGS": demo_train, "EVAL_FLAGS": "", "PATH": f"{Path(py).parent}:{os.environ['PATH']}",
        })  # fmt: skip
    outputs = {}
    for name in ("primal_dual", "trainer_overhead", "dual_solver", "logprob"):
        log = out / f"{name}.txt"  # the benchmark's printout, kept for a resumed run
        if not log.exists():
            extra = ["--out", str(out / "primal_dual")] if name == "primal_dual" else []
            log.write_text(run([py, f"benchmarks/{name}.py", *extra]))
        outputs[name] = log.read_text()
    docs = ROOT / "docs" / "evidence"
    docs.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "mocan" / "frontier.png", docs / "frontier.png")
    shutil.copy(out / "primal_dual" / "multiplier.png", docs / "multiplier.png")
    shutil.copy(out / "sweep" / "eval" / "plane.png", docs / "sweep_plane.png")
    for name in CALIBRATED:
        shutil.copy(out / name / "calibration.png", docs / f"calibration_{name.replace('-', '_')}.png")
    readme = (ROOT / "README.md").read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the {START} ... {END} markers")
    head, rest = readme.split(START, 1)
    (ROOT / "README.md").write_text(head + section(out, outputs) + rest.split(END, 1)[1])
    print(f"README.md updated; pictures in {docs}")


if __name__ == "__main__":
    main()
