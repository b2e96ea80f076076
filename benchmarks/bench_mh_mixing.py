"""Which MH variant mixes fastest per unit of latency (issue 22): uniform cuts, entropy-guided cuts,
multiple tries (k = 2, 4) and their combinations, on an enumerable toy with long deterministic
stretches and a few branching points.

The toy ("words"): a Markov model (tests/helpers/tiny_models.make_markov_model_dir) over a space token 0 (the
branching point), three 5-token words (4 letters + a space back to 0, every letter determined by the
previous one) and EOS: after a space, word A/B/C or EOS with probabilities 0.4/0.35/0.2/0.05.
Budget 15 new tokens (three words), alpha 4, one stage (block = budget). 4 of every 5 positions are
deterministic (entropy 0): a uniform cut there regenerates the rest of its word unchanged.

Exact part: the law after n MH steps of every variant from its transition matrix
(tests/helpers/toy_mixing.py: the multiple-try kernel in closed form), its TV to p^alpha, and the expected
cost of the n steps: sequential decode steps (a step decodes its 2k - 1 suffixes in parallel:
E[max of their lengths]) and row-steps ((2k - 1) E[suffix length]), plus the initial extension.
Also computed (not implemented in the sampler): multiple tries with the unselected tries as the
reference set (k rows; ALGORITHM.md remark).

Empirical part (--chains > 0): the engine runs the same toy (n chains per variant, a few step
counts); TV to p^alpha, chi-square p-value against the computed n-step law, and the measured
row-steps per chain (tokens sampled).

    python benchmarks/bench_mh_mixing.py --out benchmarks/results/mh-mixing-toy
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers.laws import chi_square_pvalue, counts_of  # noqa: E402
from helpers.tiny_models import make_markov_model_dir  # noqa: E402
from helpers.toy_mixing import PrunedTree, stage_matrices  # noqa: E402

NEG = -40.0  # logit of an impossible next token: never drawn (Gumbel noise spans < 20), p < 1e-17
BRANCH = (0.4, 0.35, 0.2)  # words A, B, C after a space; EOS gets the rest (0.05)
WORD_LEN = 5
ALPHA = 4.0

# name, sampler keywords, toy_mixing keywords, implemented
VARIANTS = [
    ("uniform", {}, {}, True),
    ("entropy", {"index": "entropy"}, {"index": "entropy"}, True),
    ("tries 2", {"mh_tries": 2}, {"tries": 2}, True),
    ("tries 4", {"mh_tries": 4}, {"tries": 4}, True),
    ("entropy + tries 2", {"index": "entropy", "mh_tries": 2}, {"index": "entropy", "tries": 2}, True),
    ("entropy + tries 4", {"index": "entropy", "mh_tries": 4}, {"index": "entropy", "tries": 4}, True),
    ("tries 4, tries as references", None, {"tries": 4, "references": "tries"}, False),
    ("entropy + tries 4, tries as references", None, {"index": "entropy", "tries": 4, "references": "tries"}, False),
]


def word_table():
    """[V, V] next-token logits given the last token, and the EOS id."""
    nw = len(BRANCH)
    V = 1 + nw * (WORD_LEN - 1) + 1
    eos = V - 1
    t = torch.full((V, V), NEG)
    for w, p in enumerate(BRANCH):
        first = 1 + w * (WORD_LEN - 1)
        t[0, first] = math.log(p)
        for j in range(WORD_LEN - 2):
            t[first + j, first + j + 1] = 0.0
        t[first + WORD_LEN - 2, 0] = 0.0
    t[0, eos] = math.log(1.0 - sum(BRANCH))
    t[eos, :] = 0.0  # never used
    return t, eos


def exact_curves(tree, tau: float, steps: int, eps: float, beta: float):
    states = tree.states()
    lp = np.array([tree.token_logprobs(s).sum() for s in states])
    pi = np.exp(ALPHA * lp - (ALPHA * lp).max())
    pi /= pi.sum()
    out = {}
    for name, _, kw, implemented in VARIANTS:
        st, v0, P, seq_c, row_c = stage_matrices(tree, alpha=ALPHA, proposal_temperature=tau, entropy_eps=eps,
                                                  entropy_beta=beta, **kw)
        assert st == states
        ext = float(v0 @ np.array([len(s) for s in states]))  # the extension: one row
        v, tvs, seq, row, laws = v0.copy(), [], [ext], [ext], []
        for n in range(steps + 1):
            tvs.append(0.5 * float(np.abs(v - pi).sum()))
            laws.append(v.copy())
            seq.append(seq[-1] + float(v @ seq_c))
            row.append(row[-1] + float(v @ row_c))
            v = v @ P
        out[name] = dict(tv=tvs, seq=seq[:-1], row=row[:-1], implemented=implemented,
                         p_move=1.0 - float(pi @ np.diag(P)), laws=laws,
                         rows=(kw.get("tries", 1) if kw.get("references") == "tries" else 2 * kw.get("tries", 1) - 1))
    return states, pi, out


def first_reach(c, thr):
    n = next((i for i, x in enumerate(c["tv"]) if x <= thr), None)
    return None if n is None else (n, c["seq"][n], c["row"][n])


def empirical(model_dir, states, pi, curves, tau, step_list, chains, seed):
    import powersample_fast as pf

    torch.set_num_threads(1)
    model, _ = pf.load(model_dir, device="cpu", dtype="float32")
    s = pf.PowerSampler(model)
    T = max(len(x) for x in states)
    rows = []
    for name, skw, _, implemented in VARIANTS:
        if not implemented:
            continue
        for n in step_list:
            t0 = time.perf_counter()
            res = s.generate([0], alpha=ALPHA, max_new_tokens=T, block_size=T, mcmc_steps=n, proposal_temperature=tau,
                             n=chains, seed=seed, progress=False, max_batch=252, **skw)
            wall = time.perf_counter() - t0
            counts = counts_of(r.token_ids for r in res)
            law = {x: float(p) for x, p in zip(states, curves[name]["laws"][n])}
            emp = {x: counts.get(x, 0) / chains for x in states}
            assert set(counts) <= set(states), "a chain left the enumerated support"
            rows.append(dict(variant=name, steps=n, chains=chains, tv_pi=0.5 * sum(abs(emp[x] - p) for x, p in zip(states, pi)),
                             tv_exact_law=curves[name]["tv"][n], chi2_p_vs_law=chi_square_pvalue(counts, law),
                             row_steps=float(np.mean([r.stats["tokens_sampled"] for r in res])),
                             row_steps_exact=curves[name]["row"][n],
                             acceptance=sum(r.accepted for r in res) / max(1, sum(r.proposed for r in res)),
                             wall_s=wall))
            print(f"  empirical {name} n={n}: TV {rows[-1]['tv_pi']:.3f} (exact law {rows[-1]['tv_exact_law']:.3f}), "
                  f"chi2 p {rows[-1]['chi2_p_vs_law']:.3g}, {wall:.1f} s", file=sys.stderr)
    return rows


def plot(path, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = list(results)
    fig, axes = plt.subplots(len(taus), 2, figsize=(11, 4.2 * len(taus)), squeeze=False)
    for r, tau in enumerate(taus):
        curves = results[tau]["curves"]
        for c, (key, label) in enumerate((("seq", "sequential decode steps"), ("row", "row-steps (tokens decoded)"))):
            ax = axes[r][c]
            for name, _, _, implemented in VARIANTS:
                cv = curves[name]
                ax.plot(cv[key], np.maximum(cv["tv"], 1e-6), "-" if implemented else ":", marker="." if implemented else None,
                        label=name + ("" if implemented else " (computed only)"))
            ax.set_yscale("log")
            ax.set_ylim(1e-4, 1)
            ax.set_xlabel(f"expected {label}")
            ax.set_ylabel("TV(law after n MH steps, p^alpha)")
            ax.set_title(f"words toy, alpha {ALPHA:g}, tau {tau:g}: TV vs {label}")
            ax.grid(True, which="both", alpha=0.3)
            if r == 0 and c == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_md(path, args, results, empirical_rows, cmd):
    L = [f"# MH mixing on an enumerable toy ({args.machine})", "",
         f"- command: `{cmd}`",
         f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; python {platform.python_version()}, "
         f"torch {torch.__version__}; machine: {args.machine} ({platform.processor() or platform.machine()})",
         f"- toy: Markov \"words\" (benchmarks/bench_mh_mixing.py): after a space, word A/B/C/EOS with p "
         f"{'/'.join(str(p) for p in BRANCH)}/{1 - sum(BRANCH):.2f}; words are {WORD_LEN} tokens (4 letters, each "
         f"determined by the previous one, + a space); budget {results[next(iter(results))]['T']} tokens (3 words), "
         f"{results[next(iter(results))]['n_states']} final states, alpha {ALPHA:g}, one stage (block = budget); "
         f"entropy cut g(h) = {args.eps:g} + h^{args.beta:g}",
         "- exact: law after n MH steps from the transition matrices (tests/helpers/toy_mixing.py); costs are expected values "
         "of the n steps plus the initial extension: sequential decode steps (2k-1 suffixes decode in parallel: "
         "E[max length]) and row-steps ((2k-1) E[length]); rows = decode rows per chain",
         ""]
    for tau, res in results.items():
        curves = res["curves"]
        L += [f"## tau = {tau:g} (proposal temperature)", "",
              "| variant | rows | TV after n = 0 / 1 / 2 / 4 / 8 / 16 / 32 / 64 steps | P(move) at pi | "
              "to TV <= 0.05: steps, seq. decode steps, row-steps | to TV <= 0.01: steps, seq., row-steps |",
              "|---|---|---|---|---|---|"]
        for name, _, _, implemented in VARIANTS:
            cv = curves[name]
            tvs = " / ".join(f"{cv['tv'][n]:.3f}" for n in (0, 1, 2, 4, 8, 16, 32, 64) if n < len(cv["tv"]))

            def fmt(thr):
                f = first_reach(cv, thr)
                return "not within 64 steps" if f is None else f"{f[0]}, {f[1]:.0f}, {f[2]:.0f}"
            L.append(f"| {name}{'' if implemented else ' (computed only)'} | {cv['rows']} | {tvs} | {cv['p_move']:.3f} "
                     f"| {fmt(0.05)} | {fmt(0.01)} |")
        L.append("")
    if empirical_rows:
        L += ["## Engine runs on the same toy (empirical)", "",
              "| tau | variant | MH steps | chains | TV(samples, p^alpha) | TV(exact n-step law, p^alpha) | "
              "chi-square p vs the n-step law | row-steps per chain (measured / expected) | acceptance | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for tau, rows in empirical_rows.items():
            for r in rows:
                L.append(f"| {tau:g} | {r['variant']} | {r['steps']} | {r['chains']} | {r['tv_pi']:.3f} | "
                         f"{r['tv_exact_law']:.3f} | {r['chi2_p_vs_law']:.3g} | {r['row_steps']:.1f} / "
                         f"{r['row_steps_exact']:.1f} | {r['acceptance']:.3f} | {r['wall_s']:.1f} |")
        L.append("")
    Path(path).write_text("\n".join(L))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mh-mixing-toy"),
                    help="output path prefix (.md, .json, .png)")
    ap.add_argument("--taus", default="1,0.5,0.25", help="proposal temperatures (comma-separated)")
    ap.add_argument("--steps", type=int, default=64, help="MH steps of the exact curves")
    ap.add_argument("--eps", type=float, default=0.1, help="entropy_eps")
    ap.add_argument("--beta", type=float, default=1.0, help="entropy_beta")
    ap.add_argument("--chains", type=int, default=0, help="engine chains per (variant, step count); 0: exact only")
    ap.add_argument("--empirical-steps", default="4,16", help="MH step counts of the engine runs")
    ap.add_argument("--empirical-tau", type=float, default=1.0, help="proposal temperature of the engine runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--machine", default=f"cpu-{__import__('os').cpu_count()}core-{platform.machine()}")
    args = ap.parse_args(argv)
    cmd = "python benchmarks/bench_mh_mixing.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table, eos = word_table()
    T = 3 * WORD_LEN
    tree = PrunedTree(lambda seqs: table[[s[-1] for s in seqs]], [0], T, eos)
    results, emp = {}, {}
    for tau in (float(x) for x in args.taus.split(",")):
        t0 = time.perf_counter()
        states, pi, curves = exact_curves(tree, tau, args.steps, args.eps, args.beta)
        results[tau] = dict(curves=curves, T=T, n_states=len(states))
        print(f"tau {tau:g}: exact curves in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if args.chains > 0 and tau == args.empirical_tau:
            with tempfile.TemporaryDirectory() as d:
                md = make_markov_model_dir(d, table.tolist(), eos)
                emp[tau] = empirical(md, states, pi, curves, tau, [int(x) for x in args.empirical_steps.split(",")],
                                     args.chains, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_md(out.with_suffix(".md"), args, results, emp, cmd)
    plot(out.with_suffix(".png"), results)
    dump = {str(tau): {name: {k: v for k, v in c.items() if k != "laws"} for name, c in r["curves"].items()}
            for tau, r in results.items()}
    out.with_suffix(".json").write_text(json.dumps(dict(command=cmd, exact=dump, empirical={str(k): v for k, v in emp.items()}),
                                                   separators=(",", ":")) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
