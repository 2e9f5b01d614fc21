"""Memory-efficient cross entropy: the forward streams each row's logits in BLOCK_V chunks with an
online max and sum (no fp32 copy of the logits), the backward recomputes the softmax from the saved lse.

Per row with label y, vocab V and label smoothing eps (as torch.nn.functional.cross_entropy):
loss = lse - (1 - eps) * z[y] - eps / V * sum_j z[j], and dloss/dz[j] = softmax(z)[j] - eps / V -
(1 - eps) * [j == y]. Rows whose label is ignore_index have loss 0 and gradient 0.
"""

import triton
import triton.language as tl


@triton.jit
def cross_entropy_fwd_kernel(
    Logits, Labels, Loss, Lse,
    stride_logits_row, V, ignore_index, label_smoothing,
    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Logits: (rows, V); Labels, Loss, Lse: (rows,). Grid: (rows,)."""
    row = tl.program_id(0).to(tl.int64)
    Logits += row * stride_logits_row
    offs_v = tl.arange(0, BLOCK_V)
    m_i = tl.full([], float("-inf"), dtype=ACC_DTYPE)  # running max
    l_i = tl.zeros([], dtype=ACC_DTYPE)  # running sum of exp(z - m_i)
    sum_z = tl.zeros([], dtype=ACC_DTYPE)  # sum of the logits, for label smoothing
    for start in range(0, V, BLOCK_V):
        mask = start + offs_v < V
        z = tl.load(Logits + start + offs_v, mask=mask, other=float("-inf")).to(ACC_DTYPE)  # [BLOCK_V]
        m_new = tl.maximum(m_i, tl.max(z, axis=0))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m_i = m_new
        sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = m_i + tl.log(l_i)
    tl.store(Lse + row, lse)

    label = tl.load(Labels + row)
    z_label = tl.load(Logits + label, mask=(label >= 0) & (label < V), other=0.0).to(ACC_DTYPE)
    loss = lse - (1.0 - label_smoothing) * z_label - label_smoothing / V * sum_z
    tl.store(Loss + row, tl.where(label == ignore_index, 0.0, loss))


@triton.jit
def cross_entropy_bwd_kernel(
    DLogits, Logits, Labels, DLoss, Lse,
    stride_dlogits_row, stride_logits_row, stride_dloss, V, ignore_index, label_smoothing,
    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """DLogits, Logits: (rows, V), possibly the same buffer (each element is read before it is
    written, by the same program); Labels, DLoss, Lse: (rows,). Grid: (rows, cdiv(V, BLOCK_V))."""
    row = tl.program_id(0).to(tl.int64)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs_v < V
    label = tl.load(Labels + row)
    dloss = tl.load(DLoss + row * stride_dloss).to(ACC_DTYPE)
    dloss = tl.where(label == ignore_index, 0.0, dloss)
    lse = tl.load(Lse + row)
    z = tl.load(Logits + row * stride_logits_row + offs_v, mask=mask, other=0.0).to(ACC_DTYPE)  # [BLOCK_V]
    grad = tl.exp(z - lse) - label_smoothing / V
    grad = tl.where(offs_v == label, grad - (1.0 - label_smoothing), grad)
    tl.store(DLogits + row * stride_dlogits_row + offs_v, (grad * dloss).to(DLogits.dtype.element_ty), mask=mask)
