"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel, with the outputs
it promises: the gradient numbers, a picture of the graph, a progress bar, a plot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path_factory.mktemp("nb"))}},
    ).execute()
    return nb


def outputs(nb):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def text_of(nb) -> str:
    return "\n".join(
        o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs(nb)
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
