"""The pipeline's DAG as a Kubeflow Pipelines v2 pipeline (what TFX compiles to on Kubeflow and
Vertex AI Pipelines): ExampleGen -> [Tuner] -> Trainer -> Evaluator -> Pusher.

Each step is a lightweight KFP component whose body calls `pipeline.kfp_components`, which runs
the same component class as the local runner, in a container image the user names: an image with
this project installed (`pip install arat-tf[kfp]`), as the one of `docs/pipeline.md`. Artifacts
are typed (`Dataset` for the examples, `Model` for the trained run, `Metrics` for the accuracies,
`Artifact` for the hyperparameters, evaluation, blessing and push record), the flags are pipeline
parameters (the training flags as one `training` dict, whose defaults are the flagfile's values,
every pipeline flag on its own), and the Pusher runs only inside `dsl.If(blessed == True)`.

Distributed training: `trainer_workers > 1` runs the Trainer as a Vertex AI CustomJob with that
many replicas (`google_cloud_pipeline_components`' `create_custom_training_job_from_component`,
one chief and N - 1 workers with the same machine). Vertex sets TF_CONFIG on each replica and the
Trainer runs `--strategy=multi_worker` (MultiWorkerMirroredStrategy); only the chief writes the
Model artifact. `trainer_gpus` requests accelerators for one Trainer pod (MirroredStrategy over its
GPUs), on Kubeflow and Vertex alike.

This module imports kfp; the local runner (`pipeline.run`) never imports it.
"""

from kfp import compiler, dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

TARGETS = ("kubeflow", "vertex")


def example_gen(dataset: str, splits: dict, subsets: dict, data_dir: str, download: bool,
                examples: Output[Dataset]):
    """ExampleGen: the dataset's splits as TFRecords, with counts and label histograms."""
    from pipeline.kfp_components import run_example_gen

    run_example_gen(dataset=dataset, splits=splits, subsets=subsets, data_dir=data_dir,
                    download=download, examples=examples)


def tuner(training: dict, strategy: str, cpu_replicas: int, verbose: int, algorithm: str,
          max_trials: int, objective: str, seed: int, search_space: dict,
          examples: Input[Dataset], best_hyperparameters: Output[Artifact]):
    """Tuner: the keras-tuner search on the train / val splits; its best trial."""
    from pipeline.kfp_components import run_tuner

    run_tuner(training=training, strategy=strategy, cpu_replicas=cpu_replicas, verbose=verbose,
              algorithm=algorithm, max_trials=max_trials, objective=objective, seed=seed,
              search_space=search_space, examples=examples,
              best_hyperparameters=best_hyperparameters)


def trainer(training: dict, strategy: str, cpu_replicas: int, verbose: int,
            examples: Input[Dataset], model: Output[Model],
            hyperparameters: Input[Artifact] = None):
    """Trainer: arat_tf.training.train on the splits (with the Tuner's values, if any)."""
    from pipeline.kfp_components import run_trainer

    run_trainer(training=training, strategy=strategy, cpu_replicas=cpu_replicas, verbose=verbose,
                examples=examples, hyperparameters=hyperparameters, model=model)


def evaluator(attacks: list, eps: float, norm: str, branch: str, seed: int, batch_size: int,
              mixed_precision: str, min_clean_accuracy: float, min_robust_accuracy: float,
              tolerance: float, serving_dir: str, examples: Input[Dataset], model: Input[Model],
              evaluation: Output[Artifact], blessing: Output[Artifact],
              metrics: Output[Metrics]) -> bool:
    """Evaluator: clean and robust accuracy on the test split; returns the blessing."""
    from pipeline.kfp_components import run_evaluator

    return run_evaluator(
        attacks=attacks, eps=eps, norm=norm, branch=branch, seed=seed, batch_size=batch_size,
        mixed_precision=mixed_precision, min_clean_accuracy=min_clean_accuracy,
        min_robust_accuracy=min_robust_accuracy, tolerance=tolerance, serving_dir=serving_dir,
        examples=examples, model=model, evaluation=evaluation, blessing=blessing, metrics=metrics)


def pusher(branch: str, serving_dir: str, model: Input[Model], blessing: Input[Artifact],
           evaluation: Input[Artifact], pushed_model: Output[Artifact]):
    """Pusher: a new SavedModel version in the serving directory (only when blessed)."""
    from pipeline.kfp_components import run_pusher

    run_pusher(branch=branch, serving_dir=serving_dir, model=model, blessing=blessing,
               evaluation=evaluation, pushed_model=pushed_model)


STEPS = {"ExampleGen": example_gen, "Tuner": tuner, "Trainer": trainer, "Evaluator": evaluator,
         "Pusher": pusher}


def component_ops(image):
    """The five steps as KFP components running in `image` (which has this project and kfp)."""
    return {name: dsl.component(function, base_image=image, install_kfp_package=False)
            for name, function in STEPS.items()}


def _vertex_trainer(trainer_op, workers, machine_type, accelerator_type, accelerator_count):
    try:
        from google_cloud_pipeline_components.v1.custom_job import (
            create_custom_training_job_from_component,
        )
    except ImportError:
        raise SystemExit(
            "error: --trainer_workers > 1 runs the Trainer as a Vertex AI CustomJob, which needs "
            "google-cloud-pipeline-components: pip install -e \".[kfp,vertex]\"") from None
    return create_custom_training_job_from_component(
        trainer_op, display_name="trainer", replica_count=workers, machine_type=machine_type,
        accelerator_type=accelerator_type or "ACCELERATOR_TYPE_UNSPECIFIED",
        accelerator_count=accelerator_count if accelerator_type else 0)


def build_pipeline(config, options, *, image, target="kubeflow", trainer_workers=1,
                   trainer_gpus=0, machine_type="n1-standard-8", accelerator_type="",
                   data_dir=None):
    """The KFP pipeline function for a `TrainConfig` and `PipelineOptions`.

    Args:
        config: the training flags (a resolved-or-not `TrainConfig`); their values become the
            defaults of the pipeline parameters.
        options: the `PipelineOptions` (splits, Tuner, Evaluator, blessing, serving dir).
        image: the container image every step runs in.
        target: "kubeflow" or "vertex" (only Vertex runs several Trainer workers).
        trainer_workers: Trainer replicas (> 1: a Vertex CustomJob under
            MultiWorkerMirroredStrategy).
        trainer_gpus: GPUs of one Trainer pod (MirroredStrategy over them).
        machine_type, accelerator_type: the Vertex workers' machine and accelerator (with
            `trainer_gpus` per worker).
        data_dir: the TFDS data dir the ExampleGen container reads (default: the flags').

    Raises:
        ValueError: impossible combinations (several workers off Vertex, a non-multi-worker
            strategy with several workers).
    """
    from pipeline.components.training_config import training_parameters

    if target not in TARGETS:
        raise ValueError(f"--target must be one of {TARGETS}, got {target!r}.")
    if trainer_workers < 1 or trainer_gpus < 0:
        raise ValueError("--trainer_workers must be >= 1 and --trainer_gpus >= 0.")
    strategy = config.strategy
    if trainer_workers > 1:
        if target != "vertex":
            raise ValueError(
                "--trainer_workers > 1 needs --target=vertex: Kubeflow Pipelines runs every step "
                "as one pod (for several machines on Kubeflow, launch a TFJob of the Kubeflow "
                "Training Operator); on one pod use --trainer_gpus with --strategy=mirrored.")
        strategy = "multi_worker"
    elif trainer_gpus > 1 and strategy == "default":
        strategy = "mirrored"
    ops = component_ops(image)
    training = training_parameters(config)

    @dsl.pipeline(name=options.name.replace("_", "-"),
                  description="arat-tf: ExampleGen -> [Tuner] -> Trainer -> Evaluator -> Pusher")
    def arat_pipeline(
        training: dict = training,
        dataset: str = config.dataset,
        train_split: str = config.train_split,
        val_split: str = config.val_split,
        test_split: str = options.test_split,
        train_subset: int = config.train_subset,
        val_subset: int = config.val_subset,
        test_subset: int = options.test_subset,
        data_dir: str = data_dir if data_dir is not None else config.data_dir,
        download: bool = config.download,
        trainer_strategy: str = strategy,
        cpu_replicas: int = config.cpu_replicas,
        verbose: int = config.verbose,
        tuner_algorithm: str = options.tuner_algorithm,
        tuner_max_trials: int = options.tuner_max_trials,
        tuner_objective: str = options.tuner_objective,
        tuner_seed: int = options.tuner_seed,
        search_space: dict = dict(options.search_space),
        eval_attacks: list = list(options.eval_attacks),
        eval_seed: int = options.eval_seed,
        eval_batch_size: int = options.eval_batch_size,
        min_clean_accuracy: float = options.min_clean_accuracy,
        min_robust_accuracy: float = options.min_robust_accuracy,
        baseline_tolerance: float = options.baseline_tolerance,
        serving_dir: str = options.serving_path,
    ):
        examples = ops["ExampleGen"](
            dataset=dataset, data_dir=data_dir, download=download,
            splits={"train": train_split, "val": val_split, "test": test_split},
            subsets={"train": train_subset, "val": val_subset, "test": test_subset},
        ).set_display_name("ExampleGen").outputs["examples"]
        hyperparameters = None
        if options.tune:
            hyperparameters = ops["Tuner"](
                training=training, strategy=trainer_strategy, cpu_replicas=cpu_replicas,
                verbose=verbose, algorithm=tuner_algorithm, max_trials=tuner_max_trials,
                objective=tuner_objective, seed=tuner_seed, search_space=search_space,
                examples=examples,
            ).set_display_name("Tuner").outputs["best_hyperparameters"]
        trainer_op = ops["Trainer"]
        if trainer_workers > 1:
            trainer_op = _vertex_trainer(trainer_op, trainer_workers, machine_type,
                                         accelerator_type, trainer_gpus)
        trainer_arguments = dict(training=training, strategy=trainer_strategy,
                                 cpu_replicas=cpu_replicas, verbose=verbose, examples=examples)
        if hyperparameters is not None:
            trainer_arguments["hyperparameters"] = hyperparameters
        trainer_task = trainer_op(**trainer_arguments).set_display_name("Trainer")
        if trainer_gpus and trainer_workers == 1:
            trainer_task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(trainer_gpus)
        model = trainer_task.outputs["model"]
        evaluator_task = ops["Evaluator"](
            attacks=eval_attacks, eps=config.eps, norm=config.attack_norm,
            branch=config.eval_branch, seed=eval_seed, batch_size=eval_batch_size,
            mixed_precision=config.mixed_precision, min_clean_accuracy=min_clean_accuracy,
            min_robust_accuracy=min_robust_accuracy, tolerance=baseline_tolerance,
            serving_dir=serving_dir, examples=examples, model=model,
        ).set_display_name("Evaluator")
        with dsl.If(evaluator_task.outputs["Output"] == True, name="blessed"):  # noqa: E712
            ops["Pusher"](
                branch=config.eval_branch, serving_dir=serving_dir, model=model,
                blessing=evaluator_task.outputs["blessing"],
                evaluation=evaluator_task.outputs["evaluation"],
            ).set_display_name("Pusher")

    return arat_pipeline


def compile_pipeline(pipeline_function, output_path):
    """Writes the KFP v2 pipeline spec (YAML) of `pipeline_function` to `output_path`."""
    compiler.Compiler().compile(pipeline_function, output_path)
