"""Our torch L-BFGS logistic regression (evaluation.fit_logistic_regression) against scikit-learn's
LogisticRegression(solver="lbfgs") on the same standardised features: accuracy, objective and time.

The features are synthetic (no encoder, no dataset needed): 100 Gaussian class means in 768-d plus
per-image noise, the shape of ViT-B features of a 100-class fine-grained dataset. Both solvers fit the same
problem: mean cross-entropy + weight_decay / 2 * ||W||^2, i.e. scikit-learn's C = 1 / (weight_decay * n).

    python bench/bench_probe.py --threads 1          # 20k x 768, 100 classes, weight decay 1e-3
    python bench/bench_probe.py --weight-decay 1e-5  # the weak end of the sweep

Both solvers run at tol 1e-4 (scikit-learn's default) and 1e-6 (ours); results in BENCHMARKS.md.
"""
import argparse
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util import evaluation as ev  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser("bench_probe.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=20000, help="training features")
    parser.add_argument("--test", type=int, default=5000, help="test features")
    parser.add_argument("--dim", type=int, default=768, help="feature width (ViT-B: 768)")
    parser.add_argument("--classes", type=int, default=100, help="classes")
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="L2 strength on the mean loss")
    parser.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iteration cap, both solvers")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for both solvers "
                        "(torch intra-op; BLAS through threadpoolctl)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data")
    return parser


def synthetic_features(args):
    generator = torch.Generator().manual_seed(args.seed)
    means = torch.randn(args.classes, args.dim, generator=generator) * 0.15
    labels = torch.randint(0, args.classes, (args.train + args.test,), generator=generator)
    features = means[labels] + torch.randn(len(labels), args.dim, generator=generator)
    x_train, x_test = ev.standardise(features[:args.train], features[args.train:])
    return x_train, labels[:args.train], x_test, labels[args.train:]


def objective(x, y, weight, bias, weight_decay):
    return (F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()).item()


def main(args):
    x_train, y_train, x_test, y_test = synthetic_features(args)
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {args.train} x {args.dim} train, {args.test} test, "
          f"{args.classes} classes, weight decay {args.weight_decay:g}")
    rows = {}
    C = 1.0 / (args.weight_decay * args.train)
    for tol in (1e-4, 1e-6):  # the stopping rule of both: max |gradient| of the mean objective <= tol
        start = time.perf_counter()  # scikit-learn's default tol is 1e-4, ours 1e-6
        weight, bias = ev.fit_logistic_regression(x_train, y_train, args.classes, args.weight_decay, args.max_iter,
                                                  tol=tol)
        seconds = time.perf_counter() - start
        accuracy = 100 * (ev.predict_logits(x_test, weight, bias).argmax(1) == y_test).float().mean().item()
        rows[("ours (torch L-BFGS, float32)", tol)] = (
            accuracy, objective(x_train, y_train, weight, bias, args.weight_decay), seconds)

        start = time.perf_counter()
        with threadpool_limits(args.threads):
            model = LogisticRegression(C=C, solver="lbfgs", max_iter=args.max_iter, tol=tol).fit(
                x_train.numpy(), y_train.numpy())
        seconds = time.perf_counter() - start
        weight = torch.tensor(model.coef_.T, dtype=torch.float32)
        bias = torch.tensor(model.intercept_, dtype=torch.float32)
        rows[("scikit-learn LogisticRegression(lbfgs, float64)", tol)] = (
            100 * model.score(x_test.numpy(), y_test.numpy()),
            objective(x_train, y_train, weight, bias, args.weight_decay), seconds)

    print(f"{'solver':<48} {'tol':>6} {'test top-1':>10} {'objective':>10} {'seconds':>8}")
    for (name, tol), (accuracy, loss, seconds) in rows.items():
        print(f"{name:<48} {tol:6.0e} {accuracy:10.2f} {loss:10.5f} {seconds:8.2f}")
    for tol in (1e-4, 1e-6):
        ours = rows[("ours (torch L-BFGS, float32)", tol)]
        theirs = rows[("scikit-learn LogisticRegression(lbfgs, float64)", tol)]
        print(f"tol {tol:g}: accuracy ours - scikit-learn = {ours[0] - theirs[0]:+.2f} points; "
              f"time scikit-learn / ours = {theirs[2] / ours[2]:.2f}x")

if __name__ == "__main__":
    main(get_args_parser().parse_args())
