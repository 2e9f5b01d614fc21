"""flashtron: FlashAttention's API (flash_attn 2.8) on Triton kernels, with an exact CPU path.

Switch `from flash_attn import flash_attn_func` to `from flashtron import flash_attn_func` and keep
the rest. Importing flashtron queries no device and compiles nothing.
"""

from flashtron.api import (
    flash_attn_combine,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from flashtron.autograd import attention_backward, attention_forward
from flashtron.padding import pad_input, unpad_input

__version__ = "0.1.0"

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
    "flash_attn_combine",
    "attention_forward",
    "attention_backward",
    "unpad_input",
    "pad_input",
]
