"""flash_attn.bert_padding's names, under flashtron: `from flash_attn.bert_padding import ...` becomes
`from flashtron.bert_padding import ...` with nothing else changed. The code is flashtron.padding."""

from flashtron.padding import (
    index_first_axis,
    index_put_first_axis,
    pad_input,
    unpad_input,
    unpad_input_for_concatenated_sequences,
)

__all__ = [
    "index_first_axis",
    "index_put_first_axis",
    "pad_input",
    "unpad_input",
    "unpad_input_for_concatenated_sequences",
]
