"""Data: from a file of records to training batches.

- `tokenizer.py` (`load_tokenizer`, the `Tokenizer` facade) over `tokenizer_backends.py` (the
  tokenizers library or sentencepiece);
- `chat_template.py`: Jinja chat templates rendered as transformers renders them;
- `dataset.py`: the record formats (alpaca, messages, sharegpt, pre-tokenized) turned into
  examples with answer-only labels (`load_dataset`);
- `batching.py`: padded and packed batches (`make_batches`, `pack`, `collate`).
"""

from .batching import collate, collate_packed, length_grouped_order, make_batches, pack
from .chat_template import render_chat
from .dataset import IGNORE_INDEX, DataReport, load_dataset, read_records
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer", "render_chat", "DataReport", "load_dataset", "read_records", "IGNORE_INDEX",
           "collate", "collate_packed", "length_grouped_order", "make_batches", "pack"]
