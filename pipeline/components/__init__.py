"""The pipeline's components: ExampleGen -> Tuner (optional) -> Trainer -> Evaluator -> Pusher.

The components import the heavy parts of arat_tf (training, evaluation, serving, keras-tuner) in
`execute`, when they run, not when the pipeline is defined.
"""

from pipeline.components.base import Component, InputSpec, OutputLocation, OutputRef
from pipeline.components.evaluator import Evaluator
from pipeline.components.example_gen import ExampleGen
from pipeline.components.pusher import Pusher
from pipeline.components.trainer import Trainer
from pipeline.components.tuner import Tuner

__all__ = ["Component", "Evaluator", "ExampleGen", "InputSpec", "OutputLocation", "OutputRef",
           "Pusher", "Trainer", "Tuner"]
