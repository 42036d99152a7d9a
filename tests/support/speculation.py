"""Shared by the speculative decoding tests: a prompt whose answer copies it, three node processes."""

from __future__ import annotations

import pytest

from .nodes import NodeProcess

PARAGRAPH = ("The caravan crossed the desert in seven days. Each evening the travellers pitched their tents "
             "near a well, fed the camels and told stories about the cities they would reach.")


def copy_prompt(model) -> list[int]:
    """A chat prompt asking SmolLM2 to repeat a paragraph: its answer copies the prompt."""
    text = model.chat_template.render([{"role": "user", "content": f"Repeat this paragraph exactly:\n\n{PARAGRAPH}"}],
                                      add_generation_prompt=True)
    return model.tokenizer.encode(text, special=True)


@pytest.fixture
def three_nodes(tmp_path):
    nodes = [NodeProcess(tmp_path / f"node{i}") for i in range(3)]
    yield nodes
    for node in nodes:
        node.stop()
