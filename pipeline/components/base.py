"""`Component`: one step of the pipeline, with typed inputs and outputs and its parameters.

A component declares what it consumes and produces (artifact types, see `pipeline.artifacts`);
the runner gives it its input `Artifact`s and one fresh, empty, TEMPORARY directory per output,
and renames those into place only after `execute` returned: a component never writes where a
later one could read a half-written output.

    class Doubler(Component):
        INPUTS = {"numbers": InputSpec(EXAMPLES)}
        OUTPUTS = {"doubled": EXAMPLES}

        def execute(self, inputs, outputs):
            ...write into outputs["doubled"].path...
            return {"doubled": {"count": 3}}          # the artifact's properties

Wiring is explicit, as in TFX: `Trainer(examples=example_gen.output("examples"), ...)`.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """An input's artifact type; optional inputs may be absent (e.g. no Tuner in the pipeline)."""

    type_name: str
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class OutputRef:
    """A reference to the output `output_name` of the component named `component`."""

    component: str
    output_name: str


@dataclasses.dataclass(frozen=True)
class OutputLocation:
    """Where an execution writes an output: `path` (temporary) becomes `final_uri` on success."""

    path: str
    final_uri: str


class Component:
    """Base class of the pipeline components.

    Args:
        parameters: JSON-serialisable settings that determine the outputs: part of the cache key.
        runtime: settings that do not change the outputs (paths of the data, verbosity, a
            `tf.distribute` strategy): recorded with the execution only when JSON-friendly, never
            part of the cache key.
        inputs: `{input name: OutputRef}` (or None for an absent optional input).
        name: the component's name in the pipeline (default: the class name).
    """

    INPUTS = {}
    OUTPUTS = {}

    def __init__(self, parameters=None, *, runtime=None, inputs=None, name=None):
        self.name = name or type(self).__name__
        self.parameters = dict(parameters or {})
        self.runtime = dict(runtime or {})
        self.inputs = {key: ref for key, ref in (inputs or {}).items() if ref is not None}
        unknown = set(self.inputs) - set(self.INPUTS)
        if unknown:
            raise ValueError(f"{self.name} has no input(s) {sorted(unknown)}; its inputs are "
                             f"{sorted(self.INPUTS)}.")
        missing = [key for key, spec in self.INPUTS.items()
                   if not spec.optional and key not in self.inputs and not self.resolved_input(key)]
        if missing:
            raise ValueError(f"{self.name} needs the input(s) {missing}.")

    def output(self, output_name):
        """An `OutputRef` to wire into a downstream component."""
        if output_name not in self.OUTPUTS:
            raise ValueError(f"{self.name} has no output {output_name!r}; its outputs are "
                             f"{sorted(self.OUTPUTS)}.")
        return OutputRef(self.name, output_name)

    def resolved_input(self, key):
        """True for inputs the component looks up itself in `resolve_inputs`, not wired."""
        return False

    def cache_parameters(self):
        """What of this component, beyond its inputs' fingerprints, goes into the cache key."""
        return self.parameters

    def resolve_inputs(self, store, inputs):
        """Inputs looked up in the metadata store rather than wired (TFX's "resolver" nodes).

        Returns:
            `{input name: Artifact}` (may be empty).
        """
        return {}

    def output_still_valid(self, artifact):
        """Whether a cached output can still be used beyond its directory existing unchanged."""
        return True

    def execute(self, inputs, outputs):
        """Does the work.

        Args:
            inputs: `{input name: Artifact}`.
            outputs: `{output name: OutputLocation}`; write into `.path` (it exists, empty).

        Returns:
            `{output name: properties dict}`.
        """
        raise NotImplementedError
