"""lowrank.data.examples: examples written as flat arrays read back as the dicts they were."""

import numpy as np
import pytest

from lowrank.data.examples import ExampleWriter, example_lengths

LISTS = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
         {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 9, 4]},  # a trained label that is not its token
         {"input_ids": [2**32 - 1, 0], "labels": [-100, 0]}]


def test_written_examples_read_back_as_dicts():
    writer = ExampleWriter()
    for e in LISTS:
        ids, labels = np.array(e["input_ids"]), np.array(e["labels"])
        writer.add(ids, labels != -100, labels)
    examples = writer.in_memory()
    assert examples == LISTS and list(examples) == LISTS and examples[-1] == LISTS[-1]
    assert example_lengths(examples).tolist() == example_lengths(LISTS).tolist() == [3, 4, 2]
    picked = examples.subset([2, 0])
    assert list(picked) == [LISTS[2], LISTS[0]] and picked.subset([1])[0] == LISTS[0]
    assert list(examples[1:]) == LISTS[1:] and examples != LISTS[:2]
    assert writer.counts() == {"input_ids": 9, "trained": 9, "offsets": 4, "label_pos": 1, "label_val": 1}
    with pytest.raises(IndexError):
        examples[3]
