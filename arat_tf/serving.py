"""Export a `BranchedClassifier` as a TensorFlow SavedModel that TF Serving loads without arat_tf.

    base_dir/
      versions/              the TF Serving model base path (--model_base_path=base_dir/versions)
        1/                   one SavedModel per version, written atomically
          saved_model.pb
          variables/         only the variables the exported BN branch reads
          assets/
          fingerprint.pb
          model_card.json    what the model is and how robust it is (TF Serving ignores it)
        2/
        ...

One BN branch is baked in ("adv" by default: the branch ARAT reports), in inference mode:
`classifier(x, training=False, branch=branch)`. The other branch's BN variables are not saved,
nor is anything else the classifier might hold beyond what the exported functions read.

Signatures:

| name | input `image` | outputs |
|---|---|---|
| `serving_default` | float32 `[batch, H, W, C]` in [0, 1] | `logits` float32 `[batch, K]`, `probabilities` (softmax), `class_id` int64 (argmax) |
| `serving_uint8` | uint8 `[batch, H, W, C]` in 0-255 (divided by 255) | the same |

An image of another shape is rejected at run time with "Shape of tensor image [...] is not
compatible with expected shape [?, H, W, C]" (the graph checks it: TF Serving does not), another
dtype with an error naming the expected and received dtypes.

Example:

    from arat_tf.serving import export_saved_model
    path = export_saved_model(model, "serving/cifar10_arat")   # -> serving/cifar10_arat/versions/1

    loaded = tf.saved_model.load(path)                        # no arat_tf needed
    outputs = loaded.signatures["serving_default"](image=images)
"""

import datetime
import json
import numbers
import os
import re
import shutil
import uuid

import tensorflow as tf

from arat_tf.models.branched_classifier import BranchedClassifier

VERSIONS_DIR = "versions"
MODEL_CARD_FILE = "model_card.json"
EXPORT_BRANCHES = ("adv", "clean")
INPUT_KEY = "image"
OUTPUT_KEYS = ("logits", "probabilities", "class_id")
FLOAT_SIGNATURE = "serving_default"
UINT8_SIGNATURE = "serving_uint8"
TEMPORARY_PREFIX = ".tmp-export-"

_VERSION_NAME = re.compile(r"^[0-9]+$")


class ExportError(RuntimeError):
    """The export cannot be written (e.g. the requested version already exists)."""


class VersionExistsError(ExportError, FileExistsError):
    """The requested version directory already exists; versions are never overwritten."""


def versions_dir(base_dir):
    """`base_dir/versions`: the directory TF Serving polls (its `--model_base_path`)."""
    return os.path.join(base_dir, VERSIONS_DIR)


def existing_versions(base_dir):
    """Sorted integer versions under `base_dir/versions` (temporary and other entries ignored)."""
    directory = versions_dir(base_dir)
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name) for name in os.listdir(directory)
        if _VERSION_NAME.match(name) and os.path.isdir(os.path.join(directory, name))
    )


def next_version(base_dir):
    """1 + the largest existing version (1 when there is none)."""
    versions = existing_versions(base_dir)
    return versions[-1] + 1 if versions else 1


def _check_classifier_and_branch(classifier, branch):
    if not isinstance(classifier, BranchedClassifier):
        raise TypeError(
            "export_saved_model expects an arat_tf BranchedClassifier (a model built by "
            "arat_tf.models.build_model or loaded from a run's model.keras), received "
            f"{type(classifier).__name__}."
        )
    if branch not in EXPORT_BRANCHES:
        raise ValueError(f"branch must be one of {EXPORT_BRANCHES}, received branch={branch!r}.")


def _check_version(version):
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, numbers.Integral) or version < 1:
        raise ValueError(f"version must be an integer >= 1, received version={version!r}.")
    return int(version)


def serving_functions(classifier, branch="adv"):
    """The two serving `tf.function`s of `classifier` with `branch` baked in (inference mode).

    Returns:
        `{signature name: tf.function}` with one input `image` each and a dict of outputs
        `logits`, `probabilities`, `class_id`.
    """
    _check_classifier_and_branch(classifier, branch)
    height, width, channels = classifier.image_shape
    expected_shape = [None, height, width, channels]

    def checked(image):
        # TF Serving feeds tensors without checking them against the signature (and a wrong rank
        # would crash the convolution kernels): check in the graph, with the input's name.
        return tf.ensure_shape(image, expected_shape)

    def outputs(images):
        logits = tf.cast(classifier(images, training=False, branch=branch), tf.float32)
        return {
            "logits": tf.identity(logits, name="logits"),
            "probabilities": tf.nn.softmax(logits, axis=-1, name="probabilities"),
            "class_id": tf.argmax(logits, axis=-1, output_type=tf.int64, name="class_id"),
        }

    @tf.function(input_signature=[tf.TensorSpec(expected_shape, tf.float32, name=INPUT_KEY)])
    def serve_float(image):
        return outputs(checked(image))

    @tf.function(input_signature=[tf.TensorSpec(expected_shape, tf.uint8, name=INPUT_KEY)])
    def serve_uint8(image):
        images = tf.cast(checked(image), tf.float32) / 255.0
        return outputs(images)

    return {FLOAT_SIGNATURE: serve_float, UINT8_SIGNATURE: serve_uint8}


def _variable_tree(classifier, concrete_functions):
    """The variables the functions read, nested by their Keras path (`res_net/stem_bn/adv_gamma`).

    Keras 3 keeps sublayers in plain Python lists, which TensorFlow's object graph does not follow,
    so the SavedModel root tracks the captured `tf.Variable`s itself; nesting them by Keras path
    makes the checkpoint keys (`tf.train.list_variables`) name the layers and BN branches.
    """
    by_id = {}
    for variable in classifier.variables:
        value = variable.value
        by_id.setdefault(id(value), variable.path)
        # Under a tf.distribute strategy the functions read the per-replica components.
        for component in getattr(value, "values", None) or ():
            by_id.setdefault(id(component), variable.path)
    used, seen = [], set()
    for function in concrete_functions:
        for variable in function.variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                used.append(variable)
    tree, names = {}, set()
    for index, variable in enumerate(used):
        path = by_id.get(id(variable)) or f"other/{variable.name.split(':')[0]}"
        if path in names:  # Keras paths are unique in practice; never drop a variable if not.
            path = f"{path}_{index}"
        names.add(path)
        parts = [part for part in path.split("/") if part]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # a variable where a layer was expected: store flat
                node, parts = tree, [path.replace("/", "|")]
                break
        node[parts[-1]] = variable
    return tree, len(used)


def build_serving_module(classifier, branch="adv"):
    """A `tf.Module` holding the serving functions and exactly the variables they read.

    Returns:
        `(module, signatures)`, to save with
        `tf.saved_model.save(module, path, signatures=signatures)`.
    """
    functions = serving_functions(classifier, branch)
    signatures = {name: function.get_concrete_function() for name, function in functions.items()}
    module = tf.Module(name="arat_tf_serving")
    module.model_variables, module.num_variables = _variable_tree(classifier, signatures.values())
    module.serve = functions[FLOAT_SIGNATURE]
    module.serve_uint8 = functions[UINT8_SIGNATURE]
    return module, signatures


def basic_model_card(classifier, branch):
    """The model card written when the caller gives none: the model and its serving interface."""
    height, width, channels = classifier.image_shape
    return {
        "model": {
            "class": type(classifier).__name__,
            "num_classes": classifier.num_classes,
            "image_shape": [height, width, channels],
            "bn_mode": classifier.bn_mode,
        },
        "branch": branch,
        "bn_mode": classifier.bn_mode,
        "serving": serving_description(classifier),
        "exported_at": utc_now(),
    }


def serving_description(classifier):
    """The signatures of an export, for model cards."""
    height, width, channels = classifier.image_shape
    shape = [None, height, width, channels]
    outputs = {
        "logits": f"float32 [batch, {classifier.num_classes}]",
        "probabilities": f"float32 [batch, {classifier.num_classes}] (softmax of logits)",
        "class_id": "int64 [batch] (argmax of logits)",
    }
    return {
        FLOAT_SIGNATURE: {"inputs": {INPUT_KEY: {"dtype": "float32", "shape": shape,
                                                  "range": [0.0, 1.0]}},
                          "outputs": outputs},
        UINT8_SIGNATURE: {"inputs": {INPUT_KEY: {"dtype": "uint8", "shape": shape,
                                                  "range": [0, 255]}},
                          "outputs": outputs},
    }


def utc_now():
    """The current UTC time as `2026-11-21T07:50:00Z`."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fsync_tree(directory):
    """Flushes every file of `directory` (and the directories themselves) to disk."""
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as stream:
                os.fsync(stream.fileno())
        _fsync_directory(root)


def _fsync_directory(directory):
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def export_saved_model(classifier, base_dir, *, branch="adv", version=None, model_card=None):
    """Writes `classifier` with one BN branch baked in as SavedModel `base_dir/versions/<N>/`.

    The SavedModel is written into a temporary directory beside the target and renamed into place,
    so TF Serving (which polls `base_dir/versions`) never sees a half-written version, and a failure
    leaves no new version behind.

    Args:
        classifier: a `BranchedClassifier` (e.g. `keras.models.load_model("run/model.keras")`).
        base_dir: export directory; the versions go to `base_dir/versions/`.
        branch: BN branch to serve, "adv" (ARAT's reported branch) or "clean".
        version: integer version >= 1; default 1 + the largest existing version. An existing
            version is never overwritten.
        model_card: JSON-serialisable dict written as `model_card.json` in the version directory
            (default: `basic_model_card`); its "version" key is set to the version if absent.

    Returns:
        The path of the new version directory.

    Raises:
        TypeError: `classifier` is not a `BranchedClassifier`, or the model card is not JSON.
        ValueError: bad `branch` or `version`.
        VersionExistsError: `base_dir/versions/<version>` exists.
    """
    _check_classifier_and_branch(classifier, branch)
    version = _check_version(version)
    if not classifier.built:
        classifier.build((None,) + tuple(classifier.image_shape))
    card = dict(basic_model_card(classifier, branch) if model_card is None else model_card)
    try:
        card_text = json.dumps(card, indent=2) + "\n"
    except (TypeError, ValueError) as error:
        raise TypeError(f"model_card must be JSON-serialisable: {error}") from None

    directory = versions_dir(base_dir)
    version = next_version(base_dir) if version is None else version
    target = os.path.join(directory, str(version))
    if os.path.exists(target):
        raise VersionExistsError(
            f"version {version} already exists at {target}; refusing to overwrite a served model "
            "(choose another version, or omit it to take the next free one)."
        )
    if "version" not in card:
        card["version"] = version
        card_text = json.dumps(card, indent=2) + "\n"

    # Everything that can fail (tracing, variable collection) happens before anything is written.
    module, signatures = build_serving_module(classifier, branch)
    os.makedirs(directory, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would hide the version from a TF Serving running as
    # another user; os.mkdir honours the umask like any other directory the user creates.
    temporary = os.path.join(
        directory, f"{TEMPORARY_PREFIX}{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    os.mkdir(temporary)
    try:
        tf.saved_model.save(module, temporary, signatures=signatures)
        with open(os.path.join(temporary, MODEL_CARD_FILE), "w") as stream:
            stream.write(card_text)
        _fsync_tree(temporary)
        if os.path.exists(target):  # another export took this version meanwhile
            raise VersionExistsError(
                f"version {version} already exists at {target} (written by a concurrent export); "
                "refusing to overwrite it."
            )
        try:
            os.rename(temporary, target)
        except OSError as error:
            raise VersionExistsError(
                f"could not move the export into {target}: {error}; refusing to overwrite it."
            ) from None
        _fsync_directory(directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target


def build_model_card(classifier, *, branch, model_path=None, config=None, evaluation=None,
                     run_dir=None):
    """The model card of an export: what was trained, how, and how robust the served branch is.

    Args:
        classifier: the exported `BranchedClassifier`.
        branch: the exported BN branch.
        model_path: the `.keras` file the classifier was loaded from.
        config: the run's `config.json` (the `TrainConfig` as a dict), or None.
        evaluation: the run's `evaluation.json` (written by the robust evaluation), or None.
        run_dir: the run directory, for the notes.

    Returns:
        A JSON-serialisable dict: dataset, method, branch, bn_mode, eps, clean_accuracy,
        robust_accuracy, attack_suite, evaluation (details or None), notes, flags (the config),
        exported_at, source_model, model, serving, arat_tf_version. Accuracies are None unless an
        evaluation of the exported branch is given; `notes` says why.
    """
    from arat_tf import __version__

    config = dict(config) if config else None
    notes = []
    where = f" in {run_dir}" if run_dir else ""
    if config is None:
        notes.append(f"No config.json{where}: the training flags are unknown.")

    clean_accuracy = robust_accuracy = attack_suite = evaluation_record = None
    if evaluation is None:
        notes.append(
            f"No evaluation was run (no evaluation.json{where}): the clean and robust accuracies "
            "are unknown."
        )
    else:
        matching = _evaluation_of_branch(evaluation, branch)
        report = matching or evaluation
        evaluation_record = {
            key: report.get(key)
            for key in ("dataset", "split", "n_examples", "branch", "norm", "eps", "suite",
                        "clean_accuracy", "robust_accuracy", "attacks", "warnings", "seed",
                        "created", "model")
        }
        variants = [v for v in evaluation.get("variants") or [] if isinstance(v, dict)]
        if variants:
            evaluation_record["variants"] = [
                {key: v.get(key) for key in ("variant", "branch", "clean_accuracy",
                                             "robust_accuracy")}
                for v in variants
            ]
        attack_suite = report.get("suite")
        if matching is not None:
            clean_accuracy = matching.get("clean_accuracy")
            robust_accuracy = matching.get("robust_accuracy")
        else:
            evaluated = sorted({str(r.get("branch")) for r in [evaluation] + variants})
            noun = "branch" if len(evaluated) == 1 else "branches"
            notes.append(
                f"evaluation.json evaluated the {' and '.join(evaluated)} {noun}, not the exported "
                f"{branch} branch: its accuracies (kept under 'evaluation') do not describe this "
                "export."
            )
        evaluation = report
        evaluated_model = evaluation.get("model")
        if evaluated_model and model_path:
            candidates = {os.path.realpath(evaluated_model)}
            if run_dir:
                candidates.add(os.path.realpath(os.path.join(run_dir, evaluated_model)))
                candidates.add(
                    os.path.realpath(os.path.join(run_dir, os.path.basename(evaluated_model)))
                )
            if os.path.realpath(model_path) not in candidates:
                notes.append(
                    f"evaluation.json describes the model {evaluated_model}, the export comes from "
                    f"{model_path}."
                )
        for warning in evaluation.get("warnings") or []:
            notes.append(f"evaluation warning: {warning}")

    training_eps = config.get("eps") if config else None
    evaluation_eps = evaluation.get("eps") if evaluation else None
    if training_eps is not None and evaluation_eps is not None and not _close(training_eps,
                                                                                  evaluation_eps):
        notes.append(
            f"Trained with eps={training_eps:.6g} but evaluated at eps={evaluation_eps:.6g}: "
            "robust_accuracy holds at the evaluation's eps."
        )
    dataset = (config or {}).get("dataset") or (evaluation or {}).get("dataset")
    card = {
        "dataset": dataset,
        "method": (config or {}).get("method"),
        "branch": branch,
        "bn_mode": classifier.bn_mode,
        "eps": training_eps if training_eps is not None else evaluation_eps,
        "clean_accuracy": clean_accuracy,
        "robust_accuracy": robust_accuracy,
        "attack_suite": attack_suite,
        "evaluation": evaluation_record,
        "notes": notes,
        "flags": config,
        "exported_at": utc_now(),
        "source_model": os.path.abspath(model_path) if model_path else None,
    }
    basic = basic_model_card(classifier, branch)
    card["model"] = basic["model"]
    card["serving"] = basic["serving"]
    card["arat_tf_version"] = __version__
    return card


def _evaluation_of_branch(evaluation, branch):
    """The report of `evaluation.json` on `branch` itself (not an affine-swap variant), or None.

    The evaluator writes the first report at the top level and, with several branches or
    variants, every report under "variants"; a report without a "branch" key is taken to be of
    the exported branch.
    """
    reports = [evaluation] + [v for v in evaluation.get("variants") or [] if isinstance(v, dict)]
    for report in reports:
        if (report.get("branch", branch) == branch
                and report.get("variant", f"branch={branch}") == f"branch={branch}"):
            return report
    return None


def _close(a, b):
    """Equal budgets up to rounding (an evaluation may print 8/255 as 0.0314; budgets on a 1/255
    grid differ by 0.0039)."""
    try:
        return abs(float(a) - float(b)) <= 1e-4
    except (TypeError, ValueError):
        return a == b
