"""`python -m pipeline.lineage --metadata_db pipelines/smoke/metadata.sqlite [--artifact ID|URI]`

Prints where an artifact came from: the execution that produced it (component, run, parameters,
code version and git commit) and, recursively, that execution's inputs, down to the data. Default
artifact: the latest pushed model (else the latest model).

    PushedModel #9 ... pushed version 1 at .../serving/versions/1
      <- Pusher execution 8 (run 1, complete) code 1a2b3c4d5e6f git 2596365
         model: Model #6 ...
           <- Trainer execution 5 (run 1, complete) ...
              parameters: {...}
              examples: Examples #1 ...  train 2048, val 512, test 256 of cifar10 3.0.2
              hyperparameters: HyperParameters #3 ... {'invariance_weight': 12.3, ...}
"""

import json

from absl import app, flags

from arat_tf.cli import usage_error
from pipeline.artifacts import MODEL, PUSHED_MODEL

flags.DEFINE_string("metadata_db", None, "The pipeline's metadata store.", required=True)
flags.DEFINE_string("artifact", None, "Artifact id or uri (default: the latest pushed model).")
flags.DEFINE_bool("parameters", True, "Print each execution's parameters.")
FLAGS = flags.FLAGS


def _summary(artifact):
    properties = artifact.properties
    if artifact.type_name == PUSHED_MODEL:
        return (f"pushed version {properties['version']} at {properties['serving_path']}"
                if properties.get("pushed") else f"not pushed: {properties.get('reason')}")
    if "counts" in properties:
        counts = ", ".join(f"{k} {v}" for k, v in properties["counts"].items())
        return f"{counts} of {properties['dataset']} {properties.get('tfds_version')}"
    if "values" in properties:
        return f"hyperparameters {properties['values']}"
    if "clean_accuracy" in properties and "suite" in properties:
        return (f"clean {properties['clean_accuracy']:.4f}, robust "
                f"{properties['robust_accuracy']:.4f} ({properties['suite']})")
    if "blessed" in properties:
        return "BLESSED" if properties["blessed"] else "NOT BLESSED"
    if "method" in properties:
        return f"{properties['method']} {properties['model']} on {properties['dataset']}"
    return ""


def lineage_lines(store, artifact, show_parameters=True):
    """The lineage tree of `artifact` as text lines (shared upstream artifacts printed once)."""
    lines, seen = [], set()

    def visit(artifact, indent, name=None):
        label = f"{name}: " if name else ""
        summary = _summary(artifact)
        lines.append(f"{indent}{label}{artifact.describe()}" + (f"  [{summary}]" if summary else ""))
        if artifact.id in seen:
            lines.append(f"{indent}  (lineage shown above)")
            return
        seen.add(artifact.id)
        execution = store.producer(artifact.id)
        if execution is None:
            return
        run = store.run(execution["run_id"])
        lines.append(f"{indent}  <- {execution['component']} execution {execution['id']} "
                     f"(run {execution['run_id']}, {execution['status']}, {execution['finished']})"
                     f" code {(run['code_version'] or '?')[:12]} git {run['git_commit']}")
        if show_parameters:
            lines.append(f"{indent}     parameters: "
                         f"{json.dumps(execution['parameters'], sort_keys=True)}")
        for input_name, upstream in store.events(execution["id"], "input").items():
            visit(upstream, indent + "     ", input_name)

    visit(artifact, "")
    return lines


def find_artifact(store, reference):
    """The artifact with id or uri `reference`, or by default the latest pushed (else any) model."""
    if reference is None:
        pushed = [a for a in store.artifacts(PUSHED_MODEL) if a.properties.get("pushed")]
        candidates = pushed or store.artifacts(MODEL)
        if not candidates:
            raise LookupError(f"{store.path} records no model yet.")
        return candidates[-1]
    if reference.isdigit():
        artifact = store.artifact(int(reference))
    else:
        matches = store.artifacts_by_uri(reference)
        artifact = matches[-1] if matches else None
    if artifact is None:
        raise LookupError(f"No artifact {reference!r} in {store.path}.")
    return artifact


def main(argv):
    if len(argv) > 1:
        raise usage_error(f"Unexpected arguments: {' '.join(argv[1:])}")
    from pipeline.metadata import MetadataStore, MetadataStoreError

    try:
        store = MetadataStore(FLAGS.metadata_db, create=False)
        artifact = find_artifact(store, FLAGS.artifact)
    except (MetadataStoreError, LookupError) as error:
        raise SystemExit(f"error: {error}") from None
    print("\n".join(lineage_lines(store, artifact, FLAGS.parameters)))


if __name__ == "__main__":
    app.run(main)
