"""Fig. 1: test PSNR against the number of iterations at inference, for NERD (one trained model, Broyden with N
f-evaluations) and for an unrolled, weight-tied explicit model trained with K iterations and then run with N."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from nerd.config import GradConfig, SolverConfig
from nerd.lab.experiments.ablations import cpu_minutes, run_notes, runs_data, scale_note, train_and_test
from nerd.lab.experiments.core import Context, base_config, evaluate_on, means, test_key
from nerd.lab.experiments.report import Outcome, Table, ps
from nerd.lab.experiments.verdict import Expect, judge


class UnrolledAt:
    """An `evaluate` method: the unrolled model's own forward (n damped iterations from z = 0, `nerd.deq.unrolled`,
    the computation it was trained with) for any n, instead of a solver that returns its best-residual iterate."""

    def __init__(self, model: torch.nn.Module, n: int) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.model.grad = replace(self.model.grad, mode="unrolled", steps=n)

    def __call__(self, y: Tensor, sigma: float) -> Tensor:
        dev = next(self.model.parameters()).device  # evaluate() keeps a plain callable's input on the CPU
        with torch.enable_grad():  # the unrolled branch of DEQDenoiser.equilibrium; no parameter needs grad
            return self.model.equilibrium(y.to(dev), sigma).x_hat.detach().to(y.device)


def iterations(ctx: Context) -> Outcome:
    b = ctx.budget
    k, lam = b.unroll, b.phantom[1]
    unrolled_name = f"unrolled-K{k}"
    configs = {
        "nerd": base_config(ctx, "iterations", "nerd"),
        # validation during training: damped fixed-point iteration, K + 1 evaluations return z_K (if its residual
        # is the lowest); the test sweep below runs the exact unrolled forward.
        unrolled_name: base_config(ctx, "iterations", unrolled_name,
                                   grad=GradConfig(mode="unrolled", steps=k, damping=lam),
                                   solver=SolverConfig(name="fixed_point", damping=lam, max_iter=k + 1, tol=0.0)),
    }
    runs, tests = train_and_test(ctx, "iterations", configs)
    sigma = 25.0
    ns = sorted(set(b.sweep) | {k, b.solver_iters})
    nerd_model = runs["nerd"]
    sweep: dict[str, dict[str, Any]] = {"nerd": {}, unrolled_name: {}}
    for n in ns:
        ctx.log(f"iterations: Set12 at N = {n} for both models")  # the sweep is long and evaluate()'s bar is tty-only
        solver = SolverConfig(name="broyden", max_iter=n + 1, tol=0.0)  # z_N is returned only once f(z_N) is known
        sweep["nerd"][f"N{n}"] = nerd_model.memo(
            test_key(ctx, sigma, f"broyden-N{n}"), lambda s=solver: evaluate_on(ctx, nerd_model.load(ctx.dev),
                                                                                 sigma, solver=s))
        run = runs[unrolled_name]
        sweep[unrolled_name][f"N{n}"] = run.memo(
            test_key(ctx, sigma, f"unrolled-N{n}"), lambda n=n, run=run: evaluate_on(
                ctx, UnrolledAt(run.load(ctx.dev), n), sigma, name=unrolled_name))
    psnr = {m: {key: means(r)[0] for key, r in d.items()} for m, d in sweep.items()}
    top = f"N{ns[-1]}"
    claims = [
        judge("NERD: more solver iterations do not degrade the result",
              [Expect(f"N{n}", f"N{b.solver_iters}", ">=") for n in ns if n > b.solver_iters], psnr["nerd"],
              resolution=ctx.res, paper_order=f"every N > {b.solver_iters} ≥ N{b.solver_iters}"),
        judge(f"Unrolled (trained with K = {k}): running it longer degrades the result",
              [Expect(f"N{k}", top, ">")], psnr[unrolled_name], resolution=ctx.res, paper_order=f"N{k} > {top}"),
    ]
    rows = [[str(n), ps(*means(sweep["nerd"][f"N{n}"])), ps(*means(sweep[unrolled_name][f"N{n}"]))] for n in ns]
    header = ["iterations N", "NERD (Broyden, N updates)", f"unrolled, trained with K = {k}"]
    train_rows = [[v, ps(*means(tests[v])), cpu_minutes(runs[v])] for v in runs]

    def plot(plt: Any) -> Any:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for m, label in (("nerd", "NERD (Broyden)"), (unrolled_name, f"unrolled, K = {k}")):
            ax.plot(ns, [psnr[m][f"N{n}"] for n in ns], "o-", label=label)
        ax.axvline(b.solver_iters, color="C0", ls=":", lw=1)
        ax.axvline(k, color="C1", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("iterations at inference N")
        ax.set_ylabel("Set12 PSNR (dB), sigma 25")
        ax.set_title("PSNR against inference iterations (Fig. 1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig

    notes = [scale_note(ctx, "iterations"), *run_notes(runs),
             f"The unrolled baseline is NERD's own layer, weight-tied, trained by backpropagating through K = {k} "
             f"damped iterations (lambda {lam:g}) from z = 0 (GradConfig mode 'unrolled'): an explicit iterative "
             "model in the role of the paper's NLRN; at test it runs exactly N such iterations.",
             "NERD at N: Broyden with tol 0 and N + 1 f-evaluations, i.e. N updates from z = 0 (the last "
             "evaluation scores z_N); it returns its lowest-residual iterate, as at any inference.",
             "Fig. 1 shows one image (Monarch); the sweep here averages the test images."]
    data = {"runs": runs_data(runs, tests), "sweep": sweep, "iterations": ns}
    return Outcome("iterations", "Fig. 1", "PSNR vs inference iterations: NERD vs an unrolled model",
                   [Table("", header, rows), Table("trained models at their own settings", ["model",
                    "PSNR/SSIM", "CPU min"], train_rows)], claims, data, notes, plot)
