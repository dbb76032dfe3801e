"""The reduced-scale reproduction of ARAT's trade-off claim, resumable across sessions.

    python benchmarks/tradeoff_study.py --data_dir ../shared/datasets/tfds

Trains every run of `configs/study/` (PGD-AT, TRADES, hybrid dual-BN, ARAT and ARAT's three
ablations, plus two diagnostics: ARAT with fixed CE weights, and ARAT attacking with BN in
inference mode; one flagfile each, all sharing `configs/study/common.flags`, so every method has
the same model, data, epochs, attack and schedule), then evaluates each on the first
`--n_examples` CIFAR-10 test images with clean accuracy, PGD-20 and AutoAttack standard, and
writes:

    <output_dir>/results.json    every number, with the evaluation settings and the timings
    <output_dir>/table.md        one row per method: clean, PGD-20, AA, clean + AA
    <output_dir>/tradeoff.png    clean vs AA, one point per method
    <output_dir>/analyses.md     the paper's measurements per run (`arat_tf.analyze`): gradient
                                 cosine and conflict ratio between the classification and
                                 invariance losses, the clean-vs-adversarial feature distance, and
                                 the Dual-BN study's mixed statistics/affine accuracies
    <output_dir>/logs/<run>/     the training, evaluation and analysis logs, metrics.csv, the
                                 evaluation JSONs and analysis/ (not the checkpoints, which stay
                                 in the run directories)

Every stage is a separate `arat_tf.train` / `arat_tf.evaluate` subprocess, exactly the commands a
user runs, and every stage is skipped when its output already exists: a killed study continues
where it stopped (training resumes from its last epoch checkpoint), so the study can run in the
background over several sessions. PGD-20 and AutoAttack are separate evaluations (AutoAttack is
not run on what PGD-20 left), so the AA column is AutoAttack's own number.

`--summarize` only rebuilds the table and plot from what is finished.
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The order runs are trained in: the paper's main comparison first, so a partial study already
# answers the main question.
RUN_ORDER = ("arat", "pgd_at", "trades", "hybrid_dual_bn", "arat_symmetric", "arat_no_predictor",
             "arat_no_split_bn", "arat_fixed_ce", "arat_attack_bn_inference")
LABELS = {
    "arat": "ARAT", "pgd_at": "PGD-AT", "trades": "TRADES", "hybrid_dual_bn": "Hybrid (dual BN)",
    "arat_symmetric": "ARAT symmetric", "arat_no_predictor": "ARAT no predictor",
    "arat_no_split_bn": "ARAT no split BN", "arat_fixed_ce": "ARAT fixed CE (1, 1) [diagnostic]",
    "arat_attack_bn_inference": "ARAT, attack BN in inference mode [diagnostic]",
}
# Not part of the paper's comparison: runs that test an explanation of what the study measured.
DIAGNOSTICS = ("arat_fixed_ce", "arat_attack_bn_inference")
EVALUATIONS = {"pgd20": "pgd20", "autoattack": "autoattack"}


def run_dir_of(flagfile):
    """The --run_dir a study flagfile names (relative to the repository)."""
    for line in open(flagfile, encoding="utf-8"):
        if line.strip().startswith("--run_dir="):
            return os.path.join(REPO, line.strip().split("=", 1)[1])
    raise SystemExit(f"error: {flagfile} has no --run_dir line.")


def run_logged(command, log_path):
    """Runs `command` from the repository root, appending its output to `log_path`."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(command)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        log.flush()
        start = time.time()
        returncode = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.write(f"# exit {returncode} after {time.time() - start:.0f} s\n")
    if returncode:
        raise SystemExit(f"error: {' '.join(command)} failed (exit {returncode}); see {log_path}.")


def logged_seconds(log_path):
    """Seconds of the successful commands of a study log (its `# exit 0 after N s` lines): a
    resumed training adds up its sessions. The logs are the one record of the timings, so study
    processes running side by side never overwrite each other's."""
    if not os.path.exists(log_path):
        return float("nan")
    with open(log_path, encoding="utf-8") as log:
        seconds = re.findall(r"^# exit 0 after (\d+) s$", log.read(), flags=re.MULTILINE)
    return sum(map(float, seconds)) if seconds else float("nan")


def train(name, flagfile, run_dir, args):
    if os.path.exists(os.path.join(run_dir, "model.keras")):
        return
    command = [sys.executable, "-m", "arat_tf.train", f"--flagfile={flagfile}",
               f"--data_dir={args.data_dir}"]
    checkpoint_index = os.path.join(run_dir, "checkpoints", "checkpoint")
    if os.path.exists(checkpoint_index):
        command.append("--resume")
    elif os.path.isdir(run_dir):
        # Killed before its first epoch ended: nothing worth keeping, start again.
        shutil.rmtree(run_dir)
    print(f"[{name}] training ({'resuming' if '--resume' in command else 'from scratch'})",
          flush=True)
    run_logged(command, os.path.join(args.output_dir, "logs", name, "train.log"))


def evaluation_path(run_dir, label, args):
    return os.path.join(run_dir, f"evaluation_{label}_{args.n_examples}.json")


def evaluate(name, run_dir, args):
    """Runs the evaluations the run does not have yet; returns `{label: report}`."""
    reports = {}
    for label, attacks in EVALUATIONS.items():
        output = evaluation_path(run_dir, label, args)
        if not os.path.exists(output):
            print(f"[{name}] evaluating {label} on {args.n_examples} test images", flush=True)
            run_logged(
                [sys.executable, "-m", "arat_tf.evaluate", f"--run_dir={run_dir}",
                 f"--data_dir={args.data_dir}", "--split=test", f"--n_examples={args.n_examples}",
                 f"--attacks={attacks}", "--branch=adv", f"--batch_size={args.eval_batch_size}",
                 f"--output={output}"],
                os.path.join(args.output_dir, "logs", name, f"evaluate_{label}.log"))
        with open(output, encoding="utf-8") as file:
            reports[label] = json.load(file)
    return reports


def analyze(name, run_dir, args):
    """`arat_tf.analyze` with every analysis that applies to the run (the others are skipped)."""
    output = os.path.join(run_dir, "analysis", "analysis.json")
    if not os.path.exists(output):
        print(f"[{name}] analysing", flush=True)
        run_logged([sys.executable, "-m", "arat_tf.analyze", f"--run_dir={run_dir}",
                    f"--data_dir={args.data_dir}"],
                   os.path.join(args.output_dir, "logs", name, "analyze.log"))


def analysis_summary(analysis):
    """The few numbers of `analysis.json` the study's second table shows."""
    conflict = (analysis.get("gradient_conflict") or {}).get("overall") or {}
    deployed = ((analysis.get("mixture") or {}).get("taps") or {}).get("deployed") or {}
    distances = [tap["wasserstein2"] for tap in deployed.values() if "wasserstein2" in tap]
    mixed = {(c["statistics"], c["affine"]): c
             for c in (analysis.get("dual_bn") or {}).get("combinations", [])}
    return {
        "gradient_cosine": conflict.get("cosine"), "conflict_ratio": conflict.get("conflict_ratio"),
        "feature_w2_deployed": sum(distances) / len(distances) if distances else None,
        "dual_bn": {f"statistics={s},affine={a}": c for (s, a), c in mixed.items()},
    }


def collect_logs(name, run_dir, output_dir):
    """Copies what documents the run (not its checkpoints) next to the study's results."""
    destination = os.path.join(output_dir, "logs", name)
    os.makedirs(destination, exist_ok=True)
    for pattern in ("flags.txt", "metrics.csv", "metrics.json", "evaluation_*.json"):
        for path in glob.glob(os.path.join(run_dir, pattern)):
            shutil.copy2(path, destination)
    if os.path.isdir(os.path.join(run_dir, "analysis")):
        shutil.copytree(os.path.join(run_dir, "analysis"), os.path.join(destination, "analysis"),
                        dirs_exist_ok=True)


def summarize(rows, args):
    """Writes results.json, table.md and tradeoff.png from the finished runs."""
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as file:
        json.dump({"n_examples": args.n_examples, "runs": rows}, file, indent=2)
    best = max((row["clean"] + row["autoattack"] for row in rows), default=None)
    lines = [
        "| method | clean | PGD-20 | AutoAttack | clean + AA | train min | AA min |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: -(r["clean"] + r["autoattack"])):
        total = row["clean"] + row["autoattack"]
        mark = "**" if total == best else ""
        lines.append(
            f"| {row['label']} | {row['clean']:.2%} | {row['pgd20']:.2%} | {row['autoattack']:.2%} "
            f"| {mark}{total:.2%}{mark} | {row['train_minutes']:.0f} | {row['aa_minutes']:.0f} |"
        )
    table = "\n".join(lines)
    with open(os.path.join(args.output_dir, "table.md"), "w", encoding="utf-8") as file:
        file.write(table + "\n")
    print(table)
    analysis_lines = [
        "| method | grad cosine (cls, inv) | conflict ratio | clean-adv feature W2 | "
        "clean acc: stats adv + affine adv / stats clean + affine adv / stats adv + affine clean |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        summary = row.get("analysis") or {}

        def number(value, form="{:.3f}"):
            return "n/a" if value is None else form.format(value)

        if not summary:
            analysis_lines.append(f"| {row['label']} | not analysed | | | |")
            continue
        mixed = summary.get("dual_bn") or {}
        dual = " / ".join(number((mixed.get(k) or {}).get("clean_accuracy"), "{:.1%}") for k in (
            "statistics=adv,affine=adv", "statistics=clean,affine=adv",
            "statistics=adv,affine=clean")) if mixed else "n/a (one BN)"
        analysis_lines.append(
            f"| {row['label']} | {number(summary.get('gradient_cosine'))} "
            f"| {number(summary.get('conflict_ratio'))} "
            f"| {number(summary.get('feature_w2_deployed'))} | {dual} |")
    with open(os.path.join(args.output_dir, "analyses.md"), "w", encoding="utf-8") as file:
        file.write("\n".join(analysis_lines) + "\n")
    print("\n".join(analysis_lines))
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 5))
    for row in rows:
        diagnostic = row["name"] in DIAGNOSTICS
        ablation = row["name"].startswith("arat_") and not diagnostic
        axes.scatter(100 * row["clean"], 100 * row["autoattack"], s=60,
                     marker="x" if diagnostic else ("^" if ablation else "o"),
                     color="tab:red" if row["name"] == "arat" else
                     ("tab:gray" if diagnostic else ("tab:orange" if ablation else "tab:blue")))
        axes.annotate(row["label"], (100 * row["clean"], 100 * row["autoattack"]),
                      textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set_xlabel("clean accuracy (%)")
    axes.set_ylabel("AutoAttack (standard) accuracy (%)")
    axes.set_title(f"Reduced-scale study: CIFAR-10, ResNet-18 x0.125, {args.n_examples} test images",
                   fontsize=9)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(os.path.join(args.output_dir, "tradeoff.png"), dpi=120)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "datasets", "tfds"))
    parser.add_argument("--config_dir", default=os.path.join(REPO, "configs", "study"))
    parser.add_argument("--runs", default=",".join(RUN_ORDER),
                        help="Comma-separated runs (flagfile names in --config_dir), in order.")
    parser.add_argument("--n_examples", type=int, default=1000, help="Test images evaluated.")
    parser.add_argument("--eval_batch_size", type=int, default=500)
    parser.add_argument("--output_dir", default=os.path.join(REPO, "benchmarks", "results",
                                                             "tradeoff_study"))
    parser.add_argument("--analyze", action=argparse.BooleanOptionalAction, default=True,
                        help="Also run arat_tf.analyze on every run (about a minute each).")
    parser.add_argument("--summarize", action="store_true",
                        help="Only rebuild the table and plot from the finished runs.")
    args = parser.parse_args()
    names = [name for name in args.runs.split(",") if name]
    unknown = [n for n in names if not os.path.exists(os.path.join(args.config_dir, f"{n}.flags"))]
    if unknown:
        parser.error(f"no flagfile for {unknown} in {args.config_dir}.")
    if args.n_examples < 1:
        parser.error("--n_examples must be >= 1.")

    rows = []
    for name in names:
        flagfile = os.path.relpath(os.path.join(args.config_dir, f"{name}.flags"), REPO)
        run_dir = run_dir_of(os.path.join(REPO, flagfile))
        if args.summarize:
            if not all(os.path.exists(evaluation_path(run_dir, label, args))
                       for label in EVALUATIONS):
                continue
        else:
            train(name, flagfile, run_dir, args)
        reports = evaluate(name, run_dir, args)  # runs only what is missing
        if args.analyze and not args.summarize:
            analyze(name, run_dir, args)
        collect_logs(name, run_dir, args.output_dir)
        logs = os.path.join(args.output_dir, "logs", name)
        pgd, autoattack = reports["pgd20"], reports["autoattack"]
        rows.append({
            "name": name, "label": LABELS.get(name, name),
            "clean": autoattack["clean_accuracy"], "pgd20": pgd["robust_accuracy"],
            "autoattack": autoattack["robust_accuracy"],
            "autoattack_per_attack": {a["name"]: a["robust_accuracy"] for a in autoattack["attacks"]},
            "train_minutes": logged_seconds(os.path.join(logs, "train.log")) / 60,
            "aa_minutes": logged_seconds(os.path.join(logs, "evaluate_autoattack.log")) / 60,
            "branch": autoattack.get("branch"), "eps": autoattack.get("eps"),
        })
        analysis_path = os.path.join(run_dir, "analysis", "analysis.json")
        if os.path.exists(analysis_path):
            with open(analysis_path, encoding="utf-8") as file:
                rows[-1]["analysis"] = analysis_summary(json.load(file))
        summarize(rows, args)  # after every run, so a partial study is already readable
    if not rows:
        summarize(rows, args)


if __name__ == "__main__":
    main()
