"""The run report: `<pipeline_root>/report/index.html` and its PNG plots.

    tradeoff.png         clean vs robust accuracy of this run's model, of the models of previous
                         runs (from the metadata store), and, for reference, the ARAT paper's
                         Table 3 points (full-scale models, AutoAttack as the authors scored it)
    attacks.png          clean accuracy, then robust accuracy after each attack (in order)
    training_curves.png  losses and accuracies per epoch (the Trainer's metrics.csv)

The page references the plots by relative path, so the directory can be copied or served as is.
A small script marks `<body data-images-loaded="true">` once every image has decoded (what the
headless-browser test checks). Every file is written atomically; the HTML last.
"""

import csv
import html
import os

from arat_tf.io_utils import atomic_save_figure, atomic_write_text
from pipeline.artifacts import MODEL, MODEL_BLESSING, MODEL_EVALUATION, PUSHED_MODEL

REPORT_DIR = "report"
REPORT_FILE = "index.html"

# ARAT paper, Table 3 (docs/method.md section 5):
# (model, method, C10 clean, C10 AA, C100 clean, C100 AA).
PAPER_TABLE_3 = (
    ("ResNet-18", "PGD-AT", 83.77, 42.42, 55.82, 19.50),
    ("ResNet-18", "TRADES", 81.25, 48.54, 54.74, 23.60),
    ("ResNet-18", "MART", 82.15, 47.83, 54.54, 26.04),
    ("ResNet-18", "ARAT", 87.82, 49.02, 67.51, 23.38),
    ("ResNet-18", "ARAT+SWA", 86.44, 50.28, 67.17, 24.36),
    ("WRN-34-10", "PGD-AT", 86.06, 46.26, 59.83, 23.94),
    ("WRN-34-10", "TRADES", 84.33, 51.75, 57.61, 26.88),
    ("WRN-34-10", "ARAT", 90.89, 50.77, 72.51, 24.18),
    ("WRN-34-10", "ARAT+SWA", 90.06, 54.03, 72.37, 27.31),
)
_PAPER_COLUMNS = {"cifar10": (2, 3), "cifar100": (4, 5)}


def paper_points(dataset):
    """`[(label, clean, robust)]` of Table 3 for `dataset` (fractions), [] if it has none."""
    if dataset not in _PAPER_COLUMNS:
        return []
    clean, robust = _PAPER_COLUMNS[dataset]
    return [(f"{row[1]} {row[0]}", row[clean] / 100, row[robust] / 100) for row in PAPER_TABLE_3]


def _outputs_of_run(store, run_id):
    """`{artifact type: Artifact}` of everything the run produced or reused."""
    found = {}
    for execution in store.executions(run_id):
        for artifact in store.events(execution["id"], "output").values():
            found[artifact.type_name] = artifact
    return found


def _previous_evaluations(store, run_id, dataset, current_id):
    """`[(run ids, clean, robust)]` of the evaluations of other runs (one point per artifact)."""
    points = {}
    for run in store.runs():
        if run["id"] == run_id:
            continue
        evaluation = _outputs_of_run(store, run["id"]).get(MODEL_EVALUATION)
        if (evaluation is None or evaluation.id == current_id
                or evaluation.properties.get("dataset") != dataset):
            continue
        runs, _, _ = points.setdefault(evaluation.id, ([], evaluation.properties["clean_accuracy"],
                                                       evaluation.properties["robust_accuracy"]))
        runs.append(run["id"])
    return list(points.values())


def plot_tradeoff(path, current, previous, paper, dataset):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5))
    if paper:
        axes.scatter([p[1] for p in paper], [p[2] for p in paper], marker="s", color="tab:blue",
                     label="reference: ARAT paper Table 3 (full scale, AutoAttack)")
        for label, clean, robust in paper:
            axes.annotate(label, (clean, robust), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")
    if previous:
        axes.scatter([p[1] for p in previous], [p[2] for p in previous], color="tab:gray",
                     label="previous runs")
        for runs, clean, robust in previous:
            axes.annotate("run " + ",".join(map(str, runs)), (clean, robust), fontsize=7,
                          xytext=(3, -9), textcoords="offset points", color="tab:gray")
    axes.scatter([current[0]], [current[1]], marker="*", s=220, color="tab:red", label="this run")
    axes.set_xlabel("clean accuracy")
    axes.set_ylabel("robust accuracy")
    axes.set_title(f"{dataset}: clean vs robust accuracy (test split)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    atomic_save_figure(figure, path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def plot_attacks(path, evaluation):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["clean"] + [a["name"] for a in evaluation["per_attack"]]
    values = [evaluation["clean_accuracy"]] + [a["robust_accuracy"]
                                               for a in evaluation["per_attack"]]
    figure, axes = plt.subplots(figsize=(7, 4))
    bars = axes.bar(names, values, color=["tab:green"] + ["tab:red"] * (len(names) - 1))
    for bar, value in zip(bars, values):
        axes.annotate(f"{value:.1%}", (bar.get_x() + bar.get_width() / 2, value), ha="center",
                      va="bottom", fontsize=8)
    axes.set_ylim(0, max(1e-3, max(values)) * 1.15)
    axes.set_ylabel("accuracy")
    axes.set_title("Robust accuracy after each attack (run in order, per-example worst case)")
    atomic_save_figure(figure, path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def read_metrics_csv(path):
    """`{column: [float or None per epoch]}` of a Trainer's metrics.csv ({} if absent)."""
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    columns = {}
    for row in rows:
        for key, value in row.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = None
            columns.setdefault(key, []).append(number)
    return columns


def plot_training_curves(path, metrics):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = metrics.get("epoch") or list(range(1, 1 + max(len(v) for v in metrics.values())))
    groups = (("losses", [k for k in metrics if "loss" in k]),
              ("accuracies", [k for k in metrics if "acc" in k]))
    figure, all_axes = plt.subplots(1, 2, figsize=(11, 4))
    for axes, (title, keys) in zip(all_axes, groups):
        for key in sorted(keys):
            points = [(e, v) for e, v in zip(epochs, metrics[key]) if v is not None]
            if points:
                axes.plot(*zip(*points), marker="o", label=key)
        axes.set_xlabel("epoch")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        if keys:
            axes.legend(fontsize=7)
    atomic_save_figure(figure, path, dpi=100, bbox_inches="tight")
    plt.close(figure)


_SCRIPT = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.length > 0 && images.every(function (image) {
    return image.complete && image.naturalWidth > 0;
  });
  document.body.setAttribute("data-images-loaded", loaded ? "true" : "false");
});
</script>"""


def _table(rows, header=None):
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header or ())
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table>{f'<tr>{cells}</tr>' if cells else ''}{body}</table>"


def write_report(store, run_id, pipeline_root):
    """Writes the report of run `run_id`; returns the path of index.html.

    Raises:
        ValueError: the run has no evaluation (it failed before the Evaluator).
    """
    run = store.run(run_id)
    outputs = _outputs_of_run(store, run_id)
    evaluation = outputs.get(MODEL_EVALUATION)
    if evaluation is None:
        raise ValueError(f"Run {run_id} has no model evaluation to report.")
    directory = os.path.join(pipeline_root, REPORT_DIR)
    os.makedirs(directory, exist_ok=True)
    properties = evaluation.properties
    dataset = properties["dataset"]
    current = (properties["clean_accuracy"], properties["robust_accuracy"])
    previous = _previous_evaluations(store, run_id, dataset, evaluation.id)
    plot_tradeoff(os.path.join(directory, "tradeoff.png"), current, previous,
                  paper_points(dataset), dataset)
    plot_attacks(os.path.join(directory, "attacks.png"), properties)
    images = [("tradeoff.png", "Trade-off: this run, previous runs, paper reference"),
              ("attacks.png", "Per-attack robust accuracy")]
    model = outputs.get(MODEL)
    metrics = read_metrics_csv(model.path("metrics.csv")) if model else {}
    if metrics:
        plot_training_curves(os.path.join(directory, "training_curves.png"), metrics)
        images.append(("training_curves.png", "Training curves (train split; validation on val)"))

    executions = store.executions(run_id)
    blessing = outputs.get(MODEL_BLESSING)
    pushed = outputs.get(PUSHED_MODEL)
    summary = [
        ("run", f"{run_id} ({run['status']}), started {run['started']}"),
        ("code version", f"{(run['code_version'] or '')[:12]} (git {run['git_commit']})"),
        ("model", model.describe() if model else "-"),
        ("clean accuracy", f"{current[0]:.2%} on {properties['n_examples']} test examples"),
        ("robust accuracy", f"{current[1]:.2%} ({properties['suite']}, {properties['norm']} "
                            f"eps={properties['eps']:.5g}, branch {properties['branch']})"),
        ("blessing", ("BLESSED" if blessing.properties["blessed"] else "NOT BLESSED") + ": "
         + "; ".join(blessing.properties["reasons"]) if blessing else "-"),
        ("push", (f"version {pushed.properties['version']} at {pushed.properties['serving_path']}"
                  if pushed.properties.get("pushed") else pushed.properties.get("reason", "-"))
         if pushed else "-"),
    ]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>ARAT pipeline report: run {run_id}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left}img{max-width:100%;border:1px solid #eee}</style></head><body>",
        f"<h1>ARAT pipeline <code>{html.escape(run['pipeline_name'])}</code>: run {run_id}</h1>",
        _table(summary),
        "<h2>Components</h2>",
        _table([(e["component"], e["status"],
                 f"execution {e['cached_from']}" if e["cached_from"] else "", e["started"])
                for e in executions], ("component", "status", "reused outputs of", "started")),
        "<h2>Robust accuracy per attack</h2>",
        _table([("clean", f"{properties['clean_accuracy']:.2%}")]
               + [(a["name"], f"{a['robust_accuracy']:.2%}") for a in properties["per_attack"]],
               ("after", "accuracy")),
    ]
    for file_name, caption in images:
        parts.append(f"<h2>{html.escape(caption)}</h2><img src='{file_name}' "
                     f"alt='{html.escape(caption)}'>")
    parts.append("<p>The paper's points are full-scale models (ResNet-18 / WRN-34-10, 100 epochs) "
                 "scored with AutoAttack as its authors ran it: a reference, not a like-for-like "
                 "comparison with small pipeline runs.</p>")
    parts.append(_SCRIPT + "</body></html>\n")
    path = os.path.join(directory, REPORT_FILE)
    atomic_write_text(path, "\n".join(parts))
    return path
