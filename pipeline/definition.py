"""The ARAT pipeline's DAG: ExampleGen -> [Tuner] -> Trainer -> Evaluator -> Pusher.

`PipelineOptions` holds every pipeline setting that is not a training flag; `build_components`
wires the components from it and a `TrainConfig` (the training flags).
"""

import dataclasses
import os

from pipeline.components import Evaluator, ExampleGen, Pusher, Trainer, Tuner
from pipeline.components.training_config import training_parameters


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Pipeline settings (the `python -m pipeline.run` flags beyond the training ones).

    Attributes:
        name, root: the pipeline's name and root directory (outputs, report).
        metadata_db: the SQLite metadata store (default `<root>/metadata.sqlite`).
        serving_dir: the Pusher's serving base directory (default `<root>/serving`).
        test_split, test_subset: ExampleGen's test split (TFDS string) and its first N (0: all).
        tune: include the Tuner; tuner_*: its settings (`python -m arat_tf.tune`).
        eval_*: the Evaluator's attacks, seed and batch size.
        min_clean_accuracy, min_robust_accuracy, baseline_tolerance: the blessing rules.
    """

    name: str = "arat"
    root: str = "pipelines/arat"
    metadata_db: str = ""
    serving_dir: str = ""
    test_split: str = "test"
    test_subset: int = 0
    tune: bool = False
    tuner_algorithm: str = "random"
    tuner_max_trials: int = 10
    tuner_objective: str = "sum"
    tuner_seed: int = 0
    search_space: dict = dataclasses.field(default_factory=dict)
    eval_attacks: tuple = ("pgd20", "autoattack")
    eval_seed: int = 0
    eval_batch_size: int = 256
    min_clean_accuracy: float = 0.0
    min_robust_accuracy: float = 0.0
    baseline_tolerance: float = 0.01

    def __post_init__(self):
        errors = []
        if not self.name:
            errors.append("--pipeline_name must not be empty")
        if not self.root:
            errors.append("--pipeline_root must not be empty")
        if self.test_subset < 0:
            errors.append(f"--test_subset must be >= 0, got {self.test_subset}")
        if self.tuner_max_trials < 1:
            errors.append(f"--max_trials must be >= 1, got {self.tuner_max_trials}")
        if not self.eval_attacks:
            errors.append("--eval_attacks must name at least one attack")
        if self.eval_batch_size < 1:
            errors.append(f"--eval_batch_size must be >= 1, got {self.eval_batch_size}")
        for name in ("min_clean_accuracy", "min_robust_accuracy"):
            if not 0 <= getattr(self, name) <= 1:
                errors.append(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.baseline_tolerance <= 1:
            errors.append(f"--baseline_tolerance must be in [0, 1], got {self.baseline_tolerance}")
        if errors:
            raise ValueError("Invalid pipeline options: " + "; ".join(errors) + ".")

    @property
    def metadata_path(self):
        return self.metadata_db or os.path.join(self.root, "metadata.sqlite")

    @property
    def serving_path(self):
        return self.serving_dir or os.path.join(self.root, "serving")


def build_components(config, options, strategy=None):
    """The pipeline's components, in order, for a `TrainConfig` and `PipelineOptions`.

    `strategy` is a prebuilt `tf.distribute.Strategy` for the Tuner, the Trainer and the
    Evaluator (None: default).
    """
    training = training_parameters(config)
    example_gen = ExampleGen(
        dataset=config.dataset,
        splits={"train": config.train_split, "val": config.val_split, "test": options.test_split},
        subsets={"train": config.train_subset, "val": config.val_subset,
                 "test": options.test_subset},
        data_dir=config.data_dir, download=config.download)
    components = [example_gen]
    tuner = None
    if options.tune:
        tuner = Tuner(
            examples=example_gen.output("examples"), training=training,
            algorithm=options.tuner_algorithm, max_trials=options.tuner_max_trials,
            objective=options.tuner_objective, seed=options.tuner_seed,
            search_space=options.search_space, verbose=config.verbose,
            distribution_strategy=strategy)
        components.append(tuner)
    trainer = Trainer(
        examples=example_gen.output("examples"),
        hyperparameters=tuner.output("best_hyperparameters") if tuner else None,
        training=training, verbose=config.verbose, strategy_name=config.strategy,
        cpu_replicas=config.cpu_replicas, strategy=strategy)
    evaluator = Evaluator(
        examples=example_gen.output("examples"), model=trainer.output("model"),
        attacks=options.eval_attacks, eps=config.eps, norm=config.attack_norm,
        branch=config.eval_branch, seed=options.eval_seed, batch_size=options.eval_batch_size,
        min_clean_accuracy=options.min_clean_accuracy,
        min_robust_accuracy=options.min_robust_accuracy, tolerance=options.baseline_tolerance,
        serving_dir=options.serving_path, strategy=strategy,
        mixed_precision=config.mixed_precision)
    pusher = Pusher(
        model=trainer.output("model"), blessing=evaluator.output("blessing"),
        evaluation=evaluator.output("evaluation"), branch=config.eval_branch,
        serving_dir=options.serving_path)
    return components + [trainer, evaluator, pusher]
