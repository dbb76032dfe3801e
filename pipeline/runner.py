"""`PipelineRunner`: runs the components in order, with caching and failure recording.

For each component, in the order given (a valid topological order of the DAG; checked):

1. Its inputs are the recorded outputs of the upstream components of THIS run, plus the ones it
   resolves from the metadata store (the Evaluator's baseline).
2. Cache key = hash(component name, parameters, input fingerprints, code version). If a completed
   execution has that key and its outputs are still there, unchanged (same fingerprint), they are
   reused: the execution is recorded as "cached" and nothing runs. A run that crashed therefore
   resumes at the component that failed: everything before it is a cache hit.
3. Otherwise it executes into fresh temporary directories `<output dir>/.tmp-<execution id>`,
   renamed to `<pipeline_root>/<component>/<output>/<execution id>` only on success. On failure
   the temporary directories are deleted, the execution and the run are marked failed with the
   traceback, and no later component runs.
   A component with `RESUMABLE = True` (the Trainer) works instead in `<output dir>/.work-<cache
   key>`, which survives a failure: the next execution with the same cache key (same inputs,
   parameters and code) finds its partial work there and continues it (the Trainer resumes from
   its last epoch checkpoint). Like the temporary directories, work directories are never an
   artifact, so no later component can read them; `force` empties them first.

`force` reruns every component (True) or the named ones (a set of names).
"""

import dataclasses
import os
import shutil
import traceback

from pipeline.artifacts import Artifact
from pipeline.components.base import OutputLocation
from pipeline.fingerprints import cache_key, code_version, directory_fingerprint, git_commit

TEMPORARY_PREFIX = ".tmp-"
WORK_PREFIX = ".work-"


class PipelineError(RuntimeError):
    """A component failed; the message names it and its error."""

    def __init__(self, message, component=None, run_id=None):
        super().__init__(message)
        self.component = component
        self.run_id = run_id


@dataclasses.dataclass
class RunResult:
    """What a run did: `statuses` maps each component to "complete" (executed) or "cached"."""

    run_id: int
    statuses: dict
    outputs: dict  # {component: {output name: Artifact}}


def _check_order(components):
    seen = set()
    for component in components:
        if component.name in seen:
            raise ValueError(f"Two components are named {component.name!r}.")
        for key, ref in component.inputs.items():
            if ref.component not in seen:
                raise ValueError(f"{component.name}.{key} reads {ref.component}, which does not run "
                                 f"before it.")
        seen.add(component.name)


def _json_friendly(values):
    return {key: value for key, value in values.items()
            if isinstance(value, (str, int, float, bool, type(None), list, dict))}


class PipelineRunner:
    """Runs `components` (in order) of the pipeline `name` rooted at `root`, recording in `store`.

    Args:
        name: the pipeline's name (recorded with each run).
        root: the pipeline root; outputs go to `<root>/<component>/<output>/<execution id>/`.
        components: `Component`s in a topological order.
        store: a `pipeline.metadata.MetadataStore`.
        force: True to rerun everything, or a collection of component names to rerun.
        log: where progress lines go (print by default).
    """

    def __init__(self, name, root, components, store, *, force=False, log=print):
        _check_order(components)
        self.name = name
        self.root = os.path.abspath(root)
        self.components = list(components)
        self.store = store
        names = {component.name for component in self.components}
        if force not in (True, False):
            unknown = set(force) - names
            if unknown:
                raise ValueError(f"Cannot force unknown component(s) {sorted(unknown)}; the "
                                 f"pipeline has {', '.join(sorted(names))}.")
        self.force = force
        self.log = log

    def _forced(self, component):
        return self.force is True or (self.force is not False and component.name in self.force)

    def run(self, flags_text=None):
        """Runs the pipeline; returns a `RunResult`. Raises `PipelineError` if a component fails."""
        code = code_version()
        run_id = self.store.start_run(self.name, self.root, code_version=code,
                                      git_commit=git_commit(), flags=flags_text)
        self.log(f"Pipeline {self.name!r} run {run_id} (root {self.root}, code {code[:12]}).")
        produced, statuses = {}, {}
        for component in self.components:
            try:
                inputs = {key: produced[ref.component][ref.output_name]
                          for key, ref in component.inputs.items()}
                inputs.update(component.resolve_inputs(self.store, inputs))
                statuses[component.name], produced[component.name] = self._run_component(
                    run_id, component, inputs, code)
            except BaseException as error:  # noqa: BLE001  (KeyboardInterrupt too: record it)
                message = f"{component.name} failed: {type(error).__name__}: {error}"
                self.store.finish_run(run_id, "failed", message)
                self.log(f"Run {run_id} FAILED: {message}")
                if isinstance(error, PipelineError) or not isinstance(error, Exception):
                    raise
                raise PipelineError(message, component.name, run_id) from error
        self.store.finish_run(run_id, "complete")
        self.log(f"Run {run_id} complete: " + ", ".join(f"{name} {status}"
                                                       for name, status in statuses.items()))
        return RunResult(run_id, statuses, produced)

    def _run_component(self, run_id, component, inputs, code):
        parameters = component.cache_parameters()
        key = cache_key(component.name, parameters,
                        {name: artifact.fingerprint for name, artifact in inputs.items()}, code)
        recorded_parameters = dict(parameters, **{
            f"runtime.{name}": value for name, value in _json_friendly(component.runtime).items()})
        if not self._forced(component):
            cached = self._usable_cache(component, key)
            if cached is not None:
                execution, outputs = cached
                self.store.record_cached_execution(run_id, component.name, recorded_parameters, key,
                                                   inputs, execution["id"], outputs)
                self.log(f"  {component.name}: cached (outputs of execution {execution['id']}).")
                return "cached", outputs
        execution_id = self.store.start_execution(run_id, component.name, recorded_parameters, key,
                                                  inputs)
        self.log(f"  {component.name}: executing (execution {execution_id}).")
        locations = {}
        try:
            for output_name in component.OUTPUTS:
                directory = os.path.join(self.root, component.name, output_name)
                final = os.path.join(directory, str(execution_id))
                resumable = getattr(component, "RESUMABLE", False)
                temporary = os.path.join(directory, f"{WORK_PREFIX}{key[:16]}" if resumable
                                         else f"{TEMPORARY_PREFIX}{execution_id}")
                stale = [final] + ([] if resumable and not self._forced(component) else [temporary])
                for path in stale:
                    if os.path.exists(path):  # a store rebuilt under an old root: never mix
                        shutil.rmtree(path)
                if os.path.isdir(temporary):
                    self.log(f"  {component.name}: continuing the work a failed execution left in "
                             f"{temporary}.")
                os.makedirs(temporary, exist_ok=True)
                locations[output_name] = OutputLocation(temporary, final)
            properties = component.execute(inputs, locations) or {}
            missing = set(component.OUTPUTS) - set(properties)
            if missing:
                raise RuntimeError(f"{component.name}.execute returned no properties for "
                                   f"{sorted(missing)}.")
            for location in locations.values():
                os.rename(location.path, location.final_uri)
        except BaseException:
            for location in locations.values():
                if not getattr(component, "RESUMABLE", False):
                    shutil.rmtree(location.path, ignore_errors=True)
                if os.path.isdir(location.final_uri):
                    shutil.rmtree(location.final_uri, ignore_errors=True)
            details = traceback.format_exc()
            self.store.fail_execution(execution_id, details)
            self.log(details.rstrip())
            raise
        outputs = {
            name: Artifact(component.OUTPUTS[name], location.final_uri, properties[name],
                           directory_fingerprint(location.final_uri))
            for name, location in locations.items()
        }
        return "complete", self.store.complete_execution(execution_id, outputs)

    def _usable_cache(self, component, key):
        execution = self.store.find_cached_execution(key)
        if execution is None:
            return None
        outputs = self.store.events(execution["id"], "output")
        if set(outputs) != set(component.OUTPUTS):
            return None
        for artifact in outputs.values():
            if not os.path.isdir(artifact.uri):
                self.log(f"  {component.name}: cached output {artifact.uri} is gone; rerunning.")
                return None
            if directory_fingerprint(artifact.uri) != artifact.fingerprint:
                self.log(f"  {component.name}: cached output {artifact.uri} was modified; rerunning.")
                return None
            if not component.output_still_valid(artifact):
                self.log(f"  {component.name}: cached output {artifact.describe()} is no longer "
                         f"valid; rerunning.")
                return None
        return execution, outputs

