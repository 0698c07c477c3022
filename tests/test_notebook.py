"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel, with the outputs
it promises: the gradient numbers, a picture of the graph, a progress bar, a plot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def execute(path: Path, workdir: Path):
    """The notebook at `path`, run top to bottom by a real kernel in `workdir`."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    ).execute()
    return nb


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    return execute(NOTEBOOK, tmp_path_factory.mktemp("nb"))


def outputs(nb):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def text_of(nb) -> str:
    """What the cells printed and showed. A kernel may flush one print() in two stream
    outputs (its flush timer fired between the writes), so streams join as they came;
    other outputs stand on lines of their own."""
    return "".join(
        o.get("text", "")
        if o.get("output_type") == "stream"
        else "\n" + o.get("data", {}).get("text/plain", "") + "\n"
        for o in outputs(nb)
    )


def test_gradients_match_the_lecture(executed):
    text = text_of(executed)
    assert "max |dL/da - (y - t)|   = 0" in text
    assert "max |dL/dV - (y - t)h^T| = 0" in text


def test_the_graph_is_drawn_with_its_nodes_and_edges(executed):
    svg = executed.cells[1].outputs[0]["data"]["image/svg+xml"]
    for name in ("x", "W", "h", "y", "L"):
        assert f'data-name="{name}"' in svg or f">{name}<" in svg
    assert 'data-from="h"' in svg or "h&#45;&gt;" in svg or "->" in svg
    mermaid = executed.cells[1].outputs[0]["data"]["text/markdown"]
    assert mermaid.startswith("```mermaid") and "-->" in mermaid


def test_the_job_trained_with_a_progress_bar_and_a_plot(executed):
    kinds = {k for o in outputs(executed) for k in o.get("data", {})}
    assert "image/png" in kinds  # the loss plot
    assert "application/vnd.jupyter.widget-view+json" in kinds  # the live progress bar
    assert "step 200/200" in text_of(executed)  # the job's repr after wait()
    line = next(ln for ln in text_of(executed).splitlines() if ln.startswith("median loss"))
    words = line.split()  # median loss: step 1 A -> step 200 B
    assert float(words[-1]) < float(words[4]) / 3


def test_the_saved_progress_output_reads_its_final_state(executed):
    bars = [
        o.data
        for o in outputs(executed)
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert len(bars) == 1  # one bar, updated in place
    assert "200/200" in bars[0]["text/plain"] and "100%" in bars[0]["text/plain"]
    assert "step 200/200" in bars[0]["text/html"] and ": done" in bars[0]["text/html"]


def test_the_saved_graph_shows_as_an_html_picture(executed):
    data = executed.cells[1].outputs[0]["data"]
    assert 'src="data:image/svg+xml;base64,' in data["text/html"]
    assert "<svg" not in data["text/html"]  # kept by JupyterLab's sanitizer in saved files


# -- examples/classifier.ipynb: a classifier trained through gg.value_and_grad on a server ---

CLASSIFIER = NOTEBOOK.parent / "classifier.ipynb"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return execute(CLASSIFIER, tmp_path_factory.mktemp("nb"))


def test_the_classifier_learns_through_value_and_grad_on_the_server(classifier):
    text = text_of(classifier)
    line = next(ln for ln in text.splitlines() if ln.startswith("loss: step 1"))
    words = line.split()  # loss: step 1 A -> step 150 B
    assert float(words[-1]) < float(words[3]) / 3
    accuracy = next(ln for ln in text.splitlines() if ln.startswith("training accuracy"))
    assert float(accuracy.split()[-1]) >= 0.9
    assert "graphs traced: 1" in text  # 150 steps, one graph
    assert "labels int64, predicted classes int64" in text  # integer labels both ways


def test_the_saved_classifier_draws_its_decision_regions(classifier):
    text = text_of(classifier)
    assert "saved and loaded fingerprint equal: True" in text
    kinds = {k for o in outputs(classifier) for k in o.get("data", {})}
    assert "image/png" in kinds
    assert "server exit status: 0" in text


def test_an_onnx_model_is_fine_tuned_with_remote_gradients(classifier):
    text = text_of(classifier)
    line = next(ln for ln in text.splitlines() if ln.startswith("fine-tuned on the server"))
    first, last = (float(w) for w in line.split()[-3::2])  # ... loss A -> B
    assert last < first / 3
    assert "ONNX model from" in text and "initializers" in text
