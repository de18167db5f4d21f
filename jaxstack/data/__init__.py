"""Data: tokenizers, synthetic datasets, SFT pipelines (grain) and packing."""

from jaxstack.data.sft import SFTBatches, read_jsonl
from jaxstack.data.synthetic import make_arithmetic_records, score_arithmetic
from jaxstack.data.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "SFTBatches",
    "load_tokenizer",
    "make_arithmetic_records",
    "read_jsonl",
    "score_arithmetic",
]
