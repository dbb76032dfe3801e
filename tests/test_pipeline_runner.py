"""Tests of the pipeline's metadata store, runner (caching, atomic outputs, failure, resume,
--force) and lineage, with small fake components that write a few files (no training)."""

import json
import os
import sqlite3

import pytest

from pipeline.artifacts import EXAMPLES, HYPERPARAMETERS, MODEL, Artifact
from pipeline.components.base import Component, InputSpec
from pipeline.lineage import find_artifact, lineage_lines
from pipeline.metadata import MetadataStore, MetadataStoreError
from pipeline.runner import PipelineError, PipelineRunner


class FakeExampleGen(Component):
    OUTPUTS = {"examples": EXAMPLES}

    def execute(self, inputs, outputs):
        with open(os.path.join(outputs["examples"].path, "train.txt"), "w") as stream:
            stream.write(f"examples of {self.parameters['dataset']}\n")
        return {"examples": {"dataset": self.parameters["dataset"], "counts": {"train": 1}}}


class FakeTuner(Component):
    INPUTS = {"examples": InputSpec(EXAMPLES)}
    OUTPUTS = {"best_hyperparameters": HYPERPARAMETERS}

    def execute(self, inputs, outputs):
        with open(os.path.join(outputs["best_hyperparameters"].path, "best.json"), "w") as stream:
            json.dump({"gamma": 30}, stream)
        return {"best_hyperparameters": {"values": {"invariance_weight": 30.0}}}


class FakeTrainer(Component):
    """Writes half its output, then fails when `parameters["fail"]` or the FAIL_TRAINER file exists."""

    INPUTS = {"examples": InputSpec(EXAMPLES), "hyperparameters": InputSpec(HYPERPARAMETERS, True)}
    OUTPUTS = {"model": MODEL}
    calls = 0

    def execute(self, inputs, outputs):
        type(self).calls += 1
        path = outputs["model"].path
        with open(os.path.join(path, "model.keras"), "w") as stream:
            stream.write(f"weights lr={self.parameters['learning_rate']}\n")
        if self.runtime.get("fail_flag") and os.path.exists(self.runtime["fail_flag"]):
            raise RuntimeError("simulated crash in the middle of training")
        return {"model": {"method": "arat", "model": "resnet", "dataset": "cifar10"}}


def build(tmp_path, learning_rate=0.1, fail_flag=None, tune=True):
    example_gen = FakeExampleGen({"dataset": "cifar10"})
    components = [example_gen]
    tuner = None
    if tune:
        tuner = FakeTuner(inputs={"examples": example_gen.output("examples")})
        components.append(tuner)
    trainer = FakeTrainer(
        {"learning_rate": learning_rate}, runtime={"fail_flag": fail_flag},
        inputs={"examples": example_gen.output("examples"),
                "hyperparameters": tuner.output("best_hyperparameters") if tuner else None})
    return components + [trainer]


def run(tmp_path, store, force=False, **kwargs):
    runner = PipelineRunner("test", str(tmp_path / "root"), build(tmp_path, **kwargs), store,
                            force=force, log=lambda line: None)
    return runner.run()


@pytest.fixture
def store(tmp_path):
    store = MetadataStore(str(tmp_path / "root" / "metadata.sqlite"))
    yield store
    store.close()


def visible_dirs(path):
    return sorted(name for name in os.listdir(path)) if os.path.isdir(path) else []


def test_store_records_runs_executions_and_artifacts(store):
    run_id = store.start_run("p", "/root", code_version="abc", git_commit="123")
    execution_id = store.start_execution(run_id, "ExampleGen", {"dataset": "mnist"}, "key1", {})
    [examples] = store.complete_execution(execution_id, {
        "examples": Artifact(EXAMPLES, "/root/e/1", {"dataset": "mnist"}, "f" * 64)}).values()
    assert examples.id is not None
    store.finish_run(run_id, "complete")
    assert store.run(run_id)["status"] == "complete"
    assert store.find_cached_execution("key1")["id"] == execution_id
    assert store.find_cached_execution("other") is None
    assert store.events(execution_id, "output")["examples"] == examples
    assert store.producer(examples.id)["component"] == "ExampleGen"
    assert store.artifacts_by_uri("/root/e/1") == [examples]
    assert store.execution(execution_id)["parameters"] == {"dataset": "mnist"}


def test_failed_execution_is_recorded_and_never_reused(store):
    run_id = store.start_run("p", "/root")
    execution_id = store.start_execution(run_id, "Trainer", {}, "key", {})
    store.fail_execution(execution_id, "Traceback: boom")
    store.finish_run(run_id, "failed", "Trainer failed: boom")
    assert store.execution(execution_id)["status"] == "failed"
    assert "boom" in store.execution(execution_id)["error"]
    assert store.run(run_id)["error"] == "Trainer failed: boom"
    assert store.find_cached_execution("key") is None


def test_corrupt_metadata_db_names_the_file(tmp_path):
    path = tmp_path / "metadata.sqlite"
    path.write_bytes(b"this is not an sqlite database, just some bytes" * 100)
    with pytest.raises(MetadataStoreError, match=r"metadata.sqlite.*corrupt or not a pipeline"):
        MetadataStore(str(path))


def test_foreign_schema_version_is_refused(tmp_path):
    path = str(tmp_path / "metadata.sqlite")
    MetadataStore(path).close()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE store_info SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(MetadataStoreError, match="schema version 99"):
        MetadataStore(path)


def test_missing_store_is_an_error_for_read_only_tools(tmp_path):
    with pytest.raises(MetadataStoreError, match="does not exist"):
        MetadataStore(str(tmp_path / "absent.sqlite"), create=False)


def test_second_run_is_served_from_cache(tmp_path, store):
    FakeTrainer.calls = 0
    first = run(tmp_path, store)
    assert set(first.statuses.values()) == {"complete"}
    model_file = first.outputs["FakeTrainer"]["model"].path("model.keras")
    mtime = os.path.getmtime(model_file)
    second = run(tmp_path, store)
    assert second.statuses == {"FakeExampleGen": "cached", "FakeTuner": "cached",
                               "FakeTrainer": "cached"}
    assert second.outputs["FakeTrainer"]["model"] == first.outputs["FakeTrainer"]["model"]
    assert FakeTrainer.calls == 1 and os.path.getmtime(model_file) == mtime
    statuses = [e["status"] for e in store.executions(second.run_id)]
    assert statuses == ["cached"] * 3


def test_parameter_change_reruns_only_that_component(tmp_path, store):
    run(tmp_path, store)
    changed = run(tmp_path, store, learning_rate=0.05)
    assert changed.statuses == {"FakeExampleGen": "cached", "FakeTuner": "cached",
                                "FakeTrainer": "complete"}


def test_force_reruns(tmp_path, store):
    run(tmp_path, store)
    assert set(run(tmp_path, store, force=True).statuses.values()) == {"complete"}
    assert run(tmp_path, store, force={"FakeTrainer"}).statuses["FakeTrainer"] == "complete"
    with pytest.raises(ValueError, match="unknown component"):
        run(tmp_path, store, force={"Trainr"})


def test_deleted_or_modified_output_is_recomputed(tmp_path, store):
    first = run(tmp_path, store)
    model = first.outputs["FakeTrainer"]["model"]
    with open(model.path("model.keras"), "a") as stream:
        stream.write("tampered\n")
    assert run(tmp_path, store).statuses["FakeTrainer"] == "complete"


def test_failing_component_leaves_no_output_and_stops_the_run(tmp_path, store):
    flag = tmp_path / "FAIL_TRAINER"
    flag.write_text("")
    with pytest.raises(PipelineError, match="FakeTrainer failed: RuntimeError: simulated crash") \
            as error:
        run(tmp_path, store, fail_flag=str(flag))
    # The half-written model.keras was in a temporary directory, deleted with it.
    assert visible_dirs(tmp_path / "root" / "FakeTrainer" / "model") == []
    run_record = store.run(error.value.run_id)
    assert run_record["status"] == "failed" and "simulated crash" in run_record["error"]
    [failed] = [e for e in store.executions(error.value.run_id) if e["component"] == "FakeTrainer"]
    assert failed["status"] == "failed" and "simulated crash" in failed["error"]
    assert store.events(failed["id"], "output") == {}
    assert store.artifacts(MODEL) == []


def test_downstream_of_a_failure_does_not_run(tmp_path, store):
    class Downstream(Component):
        INPUTS = {"model": InputSpec(MODEL)}
        OUTPUTS = {"examples": EXAMPLES}
        ran = False

        def execute(self, inputs, outputs):
            type(self).ran = True
            return {"examples": {}}

    flag = tmp_path / "FAIL_TRAINER"
    flag.write_text("")
    components = build(tmp_path, fail_flag=str(flag), tune=False)
    components.append(Downstream(inputs={"model": components[-1].output("model")}))
    runner = PipelineRunner("test", str(tmp_path / "root"), components, store, log=lambda _: None)
    with pytest.raises(PipelineError):
        runner.run()
    assert not Downstream.ran
    assert [e["component"] for e in store.executions()] == ["FakeExampleGen", "FakeTrainer"]


def test_rerun_after_a_crash_resumes_at_the_failed_component(tmp_path, store):
    FakeTrainer.calls = 0
    flag = tmp_path / "FAIL_TRAINER"
    flag.write_text("")
    with pytest.raises(PipelineError):
        run(tmp_path, store, fail_flag=str(flag))
    flag.unlink()
    resumed = run(tmp_path, store, fail_flag=str(flag))
    assert resumed.statuses == {"FakeExampleGen": "cached", "FakeTuner": "cached",
                                "FakeTrainer": "complete"}
    assert FakeTrainer.calls == 2
    assert visible_dirs(tmp_path / "root" / "FakeTrainer" / "model") == [
        str(store.producer(resumed.outputs["FakeTrainer"]["model"].id)["id"])]


def test_wiring_errors_are_explained():
    example_gen = FakeExampleGen({"dataset": "cifar10"})
    with pytest.raises(ValueError, match="needs the input"):
        FakeTrainer({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="has no output"):
        example_gen.output("model")
    trainer = FakeTrainer({"learning_rate": 0.1}, inputs={"examples": example_gen.output("examples")})
    with pytest.raises(ValueError, match="does not run before it"):
        PipelineRunner("p", "/tmp/x", [trainer, example_gen], store=None)


def test_lineage_of_a_model_lists_data_hyperparameters_and_code(tmp_path, store):
    result = run(tmp_path, store)
    run(tmp_path, store)  # cached: the lineage still points at the producing executions
    model = find_artifact(store, None)
    assert model == result.outputs["FakeTrainer"]["model"]
    text = "\n".join(lineage_lines(store, model))
    code = store.run(result.run_id)["code_version"][:12]
    assert "<- FakeTrainer execution" in text and "<- FakeExampleGen execution" in text
    assert "examples: Examples #" in text and "hyperparameters: HyperParameters #" in text
    assert f"code {code}" in text and "invariance_weight" in text
    assert find_artifact(store, model.uri) == model
    assert find_artifact(store, str(model.id)) == model
    with pytest.raises(LookupError):
        find_artifact(store, "12345")


class ResumableWorker(Component):
    """Counts its executions in a progress file that only survives in a RESUMABLE work dir."""

    INPUTS = {"examples": InputSpec(EXAMPLES)}
    OUTPUTS = {"model": MODEL}
    RESUMABLE = True

    def execute(self, inputs, outputs):
        progress = os.path.join(outputs["model"].path, "progress.txt")
        done = int(open(progress).read()) if os.path.exists(progress) else 0
        with open(progress, "w") as stream:
            stream.write(str(done + 1))
        if os.path.exists(self.runtime["fail_flag"]):
            raise RuntimeError("simulated crash after some progress")
        return {"model": {"executions_seen": done + 1}}


def test_resumable_component_continues_its_work_after_a_crash(tmp_path, store):
    flag = tmp_path / "FAIL"
    flag.write_text("")

    def run_resumable(force=False):
        example_gen = FakeExampleGen({"dataset": "cifar10"})
        worker = ResumableWorker(runtime={"fail_flag": str(flag)},
                                 inputs={"examples": example_gen.output("examples")})
        return PipelineRunner("test", str(tmp_path / "root"), [example_gen, worker], store,
                              force=force, log=lambda _: None).run()

    with pytest.raises(PipelineError):
        run_resumable()
    output_dir = tmp_path / "root" / "ResumableWorker" / "model"
    # The partial work is kept, but only under a hidden work dir: no artifact, nothing to read.
    [work_dir] = visible_dirs(output_dir)
    assert work_dir.startswith(".work-")
    assert store.executions()[-1]["status"] == "failed"
    flag.unlink()
    result = run_resumable()
    artifact = result.outputs["ResumableWorker"]["model"]
    assert artifact.properties["executions_seen"] == 2  # it continued from the crashed attempt
    assert visible_dirs(output_dir) == [os.path.basename(artifact.uri)]  # work dir renamed
    # --force starts from scratch again.
    forced = run_resumable(force=True)
    assert forced.outputs["ResumableWorker"]["model"].properties["executions_seen"] == 1
