"""flashtron: FlashAttention's API (flash_attn 2.8) on Triton kernels, with an exact CPU path.

Switch `from flash_attn import flash_attn_func` to `from flashtron import flash_attn_func` and keep
the rest. Importing flashtron queries no device and compiles nothing. Bad arguments raise
InputTypeError or InputValueError: RuntimeErrors, as flash_attn's checks raise, and also the
TypeError or ValueError each is by nature.
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
from flashtron.checks import InputError, InputTypeError, InputValueError
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
    "InputError",
    "InputTypeError",
    "InputValueError",
]
