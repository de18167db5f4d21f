"""Generation: token sampling and batched KV-cache decoding for the decoder LLMs.

`generate(model, prompts, max_new_tokens=...)` for lists of token ids; `generate_tokens` for
left-padded arrays (the rollout engine's entry point); `sample_token` and friends for logits.
"""

from jaxstack.generate.engine import (
    TRACE_COUNTS,
    GeneratedTokens,
    GenerationOutput,
    clear_compile_cache,
    generate,
    generate_tokens,
    pad_prompts,
)
from jaxstack.generate.sampling import (
    filter_logits,
    filter_mask,
    log_softmax,
    sample_token,
    sample_with_logprobs,
    token_logprobs,
)

__all__ = [
    "TRACE_COUNTS",
    "GeneratedTokens",
    "GenerationOutput",
    "clear_compile_cache",
    "filter_logits",
    "filter_mask",
    "generate",
    "generate_tokens",
    "log_softmax",
    "pad_prompts",
    "sample_token",
    "sample_with_logprobs",
    "token_logprobs",
]
