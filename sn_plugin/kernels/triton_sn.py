"""The sn_plugin ops for CUDA tensors, in Triton (same signatures and results as the C++ CPU ops).

Imported only when a CUDA tensor reaches an op (:mod:`sn_plugin.kernels.ops` registers these
functions for the CUDA dispatch key), or by tests that run the kernels through Triton's
interpreter (``TRITON_INTERPRET=1`` set before triton is imported) on CPU tensors.

Launches per call: forward = weights, moments, LN/BN statistics, affine; backward = weights,
row sums, LN/BN reductions, dx. The full-size passes run in float32 (float64 for float64
inputs); every per-(n, c) statistic is float64, as on the CPU. Nothing reads a device value
on the host: the sample count of synchronized SN stays a tensor that the kernels load.
"""
import triton
import triton.language as tl
import torch
from torch import Tensor

from .ops import flat_sizes

STATS = torch.float64
_TILE = 4096  # values per program and loop step of the full-size kernels (rows x spatial)


def _tiles(s: int):
    """(rows per program, spatial block) for rows of s values."""
    block_s = min(triton.next_power_of_2(max(s, 1)), _TILE)
    return max(1, _TILE // block_s), block_s


# ----------------------------------------------------------------- device helpers


@triton.jit
def _softmax_into(logits_ptr, out_ptr, K: tl.constexpr, HAS_IN: tl.constexpr):
    offs = tl.arange(0, 4)
    valid = (offs < K) & ((offs > 0) | HAS_IN)
    logits = tl.load(logits_ptr + offs, mask=valid, other=0.0).to(tl.float64)
    logits = tl.where(valid, logits, -float("inf"))
    e = tl.where(valid, tl.exp(logits - tl.max(logits, axis=0)), 0.0)
    tl.store(out_ptr + offs, e / tl.sum(e, axis=0), mask=offs < 3)


@triton.jit
def _mixing_weights_kernel(mean_logits_ptr, var_logits_ptr, out_ptr, K: tl.constexpr, HAS_IN: tl.constexpr):
    """out (2, 3) float64: the softmax of each logit vector (over [LN, BN] only without an IN branch)."""
    _softmax_into(mean_logits_ptr, out_ptr, K, HAS_IN)
    _softmax_into(var_logits_ptr, out_ptr + 3, K, HAS_IN)


@triton.jit
def _count(count_ptr, n, HAS_COUNT: tl.constexpr):
    """The samples M of the BN branch: the synchronized count if given, else this batch's n (a float)."""
    if HAS_COUNT:
        count = tl.load(count_ptr).to(tl.float64)
    else:
        count = tl.cast(n, tl.float64)
    return count


@triton.jit
def _sample_correction(count, SAMPLE_VARIANCES: tl.constexpr):
    """count / (count - 1) for the authors' (N, C) convention (1 below two samples), else 1."""
    factor = count * 0.0 + 1.0
    if SAMPLE_VARIANCES:
        factor = tl.where(count > 1, count / tl.maximum(count - 1, 1.0), 1.0)
    return factor


# ----------------------------------------------------------------- forward kernels


@triton.jit
def _moments_kernel(x_ptr, mean_ptr, var_ptr, rows, S, head, inv_s, inv_divisor,
                    COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    base = x_ptr + r.to(tl.int64)[:, None] * S
    # pivot: the mean of the row's first (head) values, so the sums below lose nothing to an offset
    first_cols = tl.arange(0, 8)
    first = tl.load(base + first_cols[None, :], mask=row_ok[:, None] & (first_cols[None, :] < S),
                    other=0.0).to(COMPUTE)
    pivot = tl.sum(first, axis=1) / head
    s1 = tl.zeros([BLOCK_R], dtype=tl.float64)
    s2 = tl.zeros([BLOCK_R], dtype=tl.float64)
    for start in range(0, S, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (cols[None, :] < S)
        d = tl.where(ok, tl.load(base + cols[None, :], mask=ok, other=0.0).to(COMPUTE) - pivot[:, None], 0.0)
        s1 += tl.sum(d, axis=1).to(tl.float64)
        s2 += tl.sum(d * d, axis=1).to(tl.float64)
    mean = pivot.to(tl.float64) + s1 * inv_s
    m2 = tl.maximum(s2 - s1 * s1 * inv_s, 0.0)
    tl.store(mean_ptr + r, mean, mask=row_ok)
    tl.store(var_ptr + r, m2 * inv_divisor, mask=row_ok)


@triton.jit
def _statistics_kernel(mean_in_ptr, var_in_ptr, ln_ptr, bn_ptr, src_mean_ptr, src_var_ptr, count_ptr,
                       N, n_value, C, ln_factor, SAMPLE_VARIANCES: tl.constexpr, BN_SOURCE: tl.constexpr,
                       HAS_COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """Programs 0..N-1: LN statistics of one sample; the others: BN statistics of BLOCK channels.

    BN_SOURCE: 0 no BN branch (zeros), 1 this batch, 2 given batch statistics (synchronized;
    population variance over count), 3 running statistics.
    """
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    if pid < N:
        row = pid.to(tl.int64) * C
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for start in range(0, C, BLOCK):
            c = start + offs
            acc += tl.load(mean_in_ptr + row + c, mask=c < C, other=0.0)
        mean = tl.sum(acc, axis=0) / C
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for start in range(0, C, BLOCK):
            c = start + offs
            m = tl.load(mean_in_ptr + row + c, mask=c < C, other=0.0)
            v = tl.load(var_in_ptr + row + c, mask=c < C, other=0.0)
            acc += tl.where(c < C, v + (m - mean) * (m - mean), 0.0)
        tl.store(ln_ptr + pid, mean)
        tl.store(ln_ptr + N + pid, tl.sum(acc, axis=0) / C * ln_factor)
    else:
        c = (pid - N) * BLOCK + offs
        ok = c < C
        mean = tl.zeros([BLOCK], dtype=tl.float64)
        var = tl.zeros([BLOCK], dtype=tl.float64)
        count = _count(count_ptr, n_value, HAS_COUNT)
        factor = _sample_correction(count, SAMPLE_VARIANCES)
        if BN_SOURCE == 1:
            for n in range(0, N):
                mean += tl.load(mean_in_ptr + n * C + c, mask=ok, other=0.0)
            mean = mean / tl.maximum(count, 1.0)
            for n in range(0, N):
                m = tl.load(mean_in_ptr + n * C + c, mask=ok, other=0.0)
                v = tl.load(var_in_ptr + n * C + c, mask=ok, other=0.0)
                var += v + (m - mean) * (m - mean)
            var = var / tl.maximum(count, 1.0) * factor
        elif BN_SOURCE == 2:
            mean = tl.load(src_mean_ptr + c, mask=ok, other=0.0).to(tl.float64)
            var = tl.load(src_var_ptr + c, mask=ok, other=0.0).to(tl.float64) * factor
        elif BN_SOURCE == 3:
            mean = tl.load(src_mean_ptr + c, mask=ok, other=0.0).to(tl.float64)
            var = tl.load(src_var_ptr + c, mask=ok, other=0.0).to(tl.float64)
        tl.store(bn_ptr + c, mean, mask=ok)
        tl.store(bn_ptr + C + c, var, mask=ok)


@triton.jit
def _mixed(weights_ptr, m_in, v_in, ln_ptr, bn_ptr, n, c, N, C, eps):
    """The mixed mean, variance and 1/std of rows (n, c)."""
    ln_mean = tl.load(ln_ptr + n)
    ln_var = tl.load(ln_ptr + N + n)
    bn_mean = tl.load(bn_ptr + c)
    bn_var = tl.load(bn_ptr + C + c)
    mean = (tl.load(weights_ptr) * m_in + tl.load(weights_ptr + 1) * ln_mean
            + tl.load(weights_ptr + 2) * bn_mean)
    var = (tl.load(weights_ptr + 3) * v_in + tl.load(weights_ptr + 4) * ln_var
           + tl.load(weights_ptr + 5) * bn_var)
    return mean, var, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _affine_kernel(x_ptr, y_ptr, mean_in_ptr, var_in_ptr, ln_ptr, bn_ptr, weights_ptr, gamma_ptr, beta_ptr,
                   rows, N, C, S, eps, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                   COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    n = r // C
    c = r % C
    m_in = tl.load(mean_in_ptr + r, mask=row_ok, other=0.0)
    v_in = tl.load(var_in_ptr + r, mask=row_ok, other=0.0)
    mean, var, rstd = _mixed(weights_ptr, m_in, v_in, ln_ptr, bn_ptr, tl.where(row_ok, n, 0),
                             tl.where(row_ok, c, 0), N, C, eps)
    scale = rstd
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + c, mask=row_ok, other=1.0).to(tl.float64)
    centre = m_in.to(COMPUTE)  # the row's mean in the compute precision: (x - centre) is exact
    shift = (centre.to(tl.float64) - mean) * scale
    if HAS_BETA:
        shift += tl.load(beta_ptr + c, mask=row_ok, other=0.0).to(tl.float64)
    scale_c = scale.to(COMPUTE)[:, None]
    shift_c = shift.to(COMPUTE)[:, None]
    offset = r.to(tl.int64)[:, None] * S
    for start in range(0, S, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (cols[None, :] < S)
        x = tl.load(x_ptr + offset + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
        y = (x - centre[:, None]) * scale_c + shift_c
        tl.store(y_ptr + offset + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _running_stats_kernel(mean_ptr, var_ptr, bn_ptr, count_ptr, n_value, S, C, momentum,
                          HAS_COUNT: tl.constexpr, UNBIASED: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    values = _count(count_ptr, n_value, HAS_COUNT) * S
    # nothing to learn from one value per channel; BatchNorm's unbiased variance by default,
    # the BN variance as used in the authors' convention
    weight = tl.where(values > 1, momentum, 0.0)
    correction = values * 0.0 + 1.0
    if not UNBIASED:
        correction = values / tl.maximum(values - 1, 1.0)
    ok = c < C
    old_mean = tl.load(mean_ptr + c, mask=ok, other=0.0)
    old_var = tl.load(var_ptr + c, mask=ok, other=0.0)
    mean = old_mean.to(tl.float64) + weight * (tl.load(bn_ptr + c, mask=ok, other=0.0) - old_mean.to(tl.float64))
    var = old_var.to(tl.float64) + weight * (tl.load(bn_ptr + C + c, mask=ok, other=0.0) * correction
                                             - old_var.to(tl.float64))
    tl.store(mean_ptr + c, mean.to(old_mean.dtype), mask=ok)
    tl.store(var_ptr + c, var.to(old_var.dtype), mask=ok)


# ----------------------------------------------------------------- backward kernels


@triton.jit
def _grad_rows_kernel(dy_ptr, x_ptr, mean_in_ptr, ln_ptr, bn_ptr, weights_ptr, gamma_ptr, out_ptr,
                      rows, N, C, S, eps, inv_divisor, HAS_GAMMA: tl.constexpr, COMPUTE: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per row: out[0..2] = dL/dmean, dL/dvar, var_in; out[3..4] = the row's gamma and beta
    gradient terms; out[5..10] = its terms of the logit gradients (relative to the mixed
    statistics: means [IN, LN, BN], variances [IN, LN, BN])."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    m_in = tl.load(mean_in_ptr + r, mask=row_ok, other=0.0)
    centre = m_in.to(COMPUTE)
    offset = r.to(tl.int64)[:, None] * S
    s_dy = tl.zeros([BLOCK_R], dtype=tl.float64)
    s_dy_xc = tl.zeros([BLOCK_R], dtype=tl.float64)
    s_xc2 = tl.zeros([BLOCK_R], dtype=tl.float64)
    for start in range(0, S, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (cols[None, :] < S)
        dy = tl.load(dy_ptr + offset + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
        xc = tl.where(ok, tl.load(x_ptr + offset + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
                      - centre[:, None], 0.0)
        s_dy += tl.sum(dy, axis=1).to(tl.float64)
        s_dy_xc += tl.sum(dy * xc, axis=1).to(tl.float64)
        s_xc2 += tl.sum(xc * xc, axis=1).to(tl.float64)
    # from the rounded centre to the exact mean: sum(x - centre) = S * (mean_in - centre)
    shift = centre.to(tl.float64) - m_in
    s_dy_xc += shift * s_dy
    v_in = tl.maximum(s_xc2 - S * shift * shift, 0.0) * inv_divisor
    n = tl.where(row_ok, r // C, 0)
    c = tl.where(row_ok, r % C, 0)
    mean, var, rstd = _mixed(weights_ptr, m_in, v_in, ln_ptr, bn_ptr, n, c, N, C, eps)
    gamma = m_in * 0.0 + 1.0
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + c, mask=row_ok, other=1.0).to(tl.float64)
    dy_xmean = s_dy_xc + (m_in - mean) * s_dy  # sum dy * (x - mean)
    d_mean = tl.where(row_ok, -rstd * gamma * s_dy, 0.0)
    d_var = tl.where(row_ok, -0.5 * rstd * rstd * rstd * gamma * dy_xmean, 0.0)
    tl.store(out_ptr + r, d_mean, mask=row_ok)
    tl.store(out_ptr + rows + r, d_var, mask=row_ok)
    tl.store(out_ptr + 2 * rows + r, v_in, mask=row_ok)
    tl.store(out_ptr + 3 * rows + r, tl.where(row_ok, rstd * dy_xmean, 0.0), mask=row_ok)
    tl.store(out_ptr + 4 * rows + r, s_dy, mask=row_ok)
    tl.store(out_ptr + 5 * rows + r, d_mean * (m_in - mean), mask=row_ok)
    tl.store(out_ptr + 6 * rows + r, d_mean * (tl.load(ln_ptr + n) - mean), mask=row_ok)
    tl.store(out_ptr + 7 * rows + r, d_mean * (tl.load(bn_ptr + c) - mean), mask=row_ok)
    tl.store(out_ptr + 8 * rows + r, d_var * (v_in - var), mask=row_ok)
    tl.store(out_ptr + 9 * rows + r, d_var * (tl.load(ln_ptr + N + n) - var), mask=row_ok)
    tl.store(out_ptr + 10 * rows + r, d_var * (tl.load(bn_ptr + C + c) - var), mask=row_ok)


@triton.jit
def _grad_reduce_kernel(rows_ptr, ln_grad_ptr, bn_grad_ptr, gamma_grad_ptr, beta_grad_ptr, logit_part_ptr,
                        N, C, BLOCK: tl.constexpr):
    """Programs 0..N-1: sums over c of one sample's dL/dmean, dL/dvar and logit terms; the
    others: sums over n for BLOCK channels of dL/dmean, dL/dvar and the gamma/beta terms."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    rows = N * C
    if pid < N:
        base = pid.to(tl.int64) * C
        for k in tl.static_range(8):  # fields d_mean, d_var, then the six logit terms (5..10)
            acc = tl.zeros([BLOCK], dtype=tl.float64)
            for start in range(0, C, BLOCK):
                c = start + offs
                acc += tl.load(rows_ptr + (k + 3 * (k >= 2)) * rows + base + c, mask=c < C, other=0.0)
            total = tl.sum(acc, axis=0)
            if k < 2:
                tl.store(ln_grad_ptr + k * N + pid, total)
            else:
                tl.store(logit_part_ptr + pid * 6 + (k - 2), total)
    else:
        c = (pid - N) * BLOCK + offs
        ok = c < C
        for k in tl.static_range(4):  # fields d_mean, d_var, then the gamma and beta terms (3, 4)
            acc = tl.zeros([BLOCK], dtype=tl.float64)
            for n in range(0, N):
                acc += tl.load(rows_ptr + (k + (k >= 2)) * rows + n * C + c, mask=ok, other=0.0)
            if k < 2:
                tl.store(bn_grad_ptr + k * C + c, acc, mask=ok)
            elif k == 2:
                tl.store(gamma_grad_ptr + c, acc, mask=ok)
            else:
                tl.store(beta_grad_ptr + c, acc, mask=ok)


@triton.jit
def _dx_kernel(dy_ptr, x_ptr, dx_ptr, mean_in_ptr, row_grads_ptr, ln_ptr, bn_ptr, ln_grad_ptr, bn_grad_ptr,
               weights_ptr, gamma_ptr, count_ptr, rows, N, n_value, C, S, eps, inv_s, inv_divisor, ln_factor,
               SAMPLE_VARIANCES: tl.constexpr, BN_FROM_BATCH: tl.constexpr, HAS_COUNT: tl.constexpr,
               HAS_GAMMA: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx = k * dy + a * (x - mean_in) + b per row, from the gradients of the IN statistics
    (the paper's Appendix H; LN and BN statistics are derived from the IN ones)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    n = tl.where(row_ok, r // C, 0)
    c = tl.where(row_ok, r % C, 0)
    m_in = tl.load(mean_in_ptr + r, mask=row_ok, other=0.0)
    d_mean = tl.load(row_grads_ptr + r, mask=row_ok, other=0.0)
    d_var = tl.load(row_grads_ptr + rows + r, mask=row_ok, other=0.0)
    v_in = tl.load(row_grads_ptr + 2 * rows + r, mask=row_ok, other=0.0)
    _, _, rstd = _mixed(weights_ptr, m_in, v_in, ln_ptr, bn_ptr, n, c, N, C, eps)
    w_mean_in, w_mean_ln, w_mean_bn = tl.load(weights_ptr), tl.load(weights_ptr + 1), tl.load(weights_ptr + 2)
    w_var_in, w_var_ln, w_var_bn = tl.load(weights_ptr + 3), tl.load(weights_ptr + 4), tl.load(weights_ptr + 5)
    ln_dm = tl.load(ln_grad_ptr + n) / C
    ln_dv = tl.load(ln_grad_ptr + N + n) / C * ln_factor
    grad_mean = w_mean_in * d_mean + w_mean_ln * ln_dm + 2.0 * w_var_ln * ln_dv * (m_in - tl.load(ln_ptr + n))
    grad_var = w_var_in * d_var + w_var_ln * ln_dv
    if BN_FROM_BATCH:
        count = tl.maximum(_count(count_ptr, n_value, HAS_COUNT), 1.0)
        factor = _sample_correction(count, SAMPLE_VARIANCES)
        bn_dm = tl.load(bn_grad_ptr + c) / count
        bn_dv = tl.load(bn_grad_ptr + C + c) / count * factor
        grad_mean += w_mean_bn * bn_dm + 2.0 * w_var_bn * bn_dv * (m_in - tl.load(bn_ptr + c))
        grad_var += w_var_bn * bn_dv
    k = rstd
    if HAS_GAMMA:
        k = k * tl.load(gamma_ptr + c, mask=row_ok, other=1.0).to(tl.float64)
    a = 2.0 * grad_var * inv_divisor
    centre = m_in.to(COMPUTE)
    b = grad_mean * inv_s + a * (centre.to(tl.float64) - m_in)
    k_c, a_c, b_c = k.to(COMPUTE)[:, None], a.to(COMPUTE)[:, None], b.to(COMPUTE)[:, None]
    offset = r.to(tl.int64)[:, None] * S
    for start in range(0, S, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (cols[None, :] < S)
        dy = tl.load(dy_ptr + offset + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + offset + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
        dx = dy * k_c + (x - centre[:, None]) * a_c + b_c
        tl.store(dx_ptr + offset + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------- the ops


class _Layer:
    """Sizes and per-call constants of one op call."""

    def __init__(self, x: Tensor, unbiased: bool, has_in: bool = True, mean_logits: Tensor = None):
        self.n, self.c, self.s = flat_sizes(x)
        self.rows = self.n * self.c
        self.compute = tl.float64 if x.dtype == torch.float64 else tl.float32
        divisor = self.s - 1 if unbiased and self.s > 1 else self.s
        self.inv_s = 1.0 / self.s if self.s else 0.0
        self.inv_divisor = 1.0 / divisor if divisor else 0.0
        self.sample_variances = unbiased and not has_in
        self.ln_factor = self.c / (self.c - 1) if self.sample_variances and self.c > 1 else 1.0
        self.block_r, self.block_s = _tiles(self.s)
        self.row_grid = (triton.cdiv(max(self.rows, 1), self.block_r),)
        self.block_c = min(triton.next_power_of_2(max(self.c, 1)), 1024)
        self.stats_grid = (self.n + triton.cdiv(max(self.c, 1), self.block_c),)
        self.has_bn = mean_logits is not None and mean_logits.numel() == 3
        self.has_in = has_in


def _weights(mean_logits: Tensor, var_logits: Tensor, has_in: bool) -> Tensor:
    out = torch.zeros(2, 3, dtype=STATS, device=mean_logits.device)
    _mixing_weights_kernel[(1,)](mean_logits, var_logits, out, K=mean_logits.numel(), HAS_IN=has_in)
    return out


def _or(t, like):
    """A stand-in pointer for an absent optional tensor (the kernels do not read it)."""
    return like if t is None else t


def moments(x: Tensor, unbiased: bool):
    L = _Layer(x, unbiased)
    mean_in = x.new_empty((L.n, L.c), dtype=STATS)
    var_in = x.new_empty((L.n, L.c), dtype=STATS)
    if L.rows and L.s:
        _moments_kernel[L.row_grid](x, mean_in, var_in, L.rows, L.s, float(min(L.s, 8)), L.inv_s, L.inv_divisor,
                                    COMPUTE=L.compute, BLOCK_R=L.block_r, BLOCK_S=L.block_s)
    else:
        mean_in.zero_(), var_in.zero_()
    return mean_in, var_in


def normalize(x, mean_in, var_in, batch_mean, batch_var, batch_count, mean_logits, var_logits, weight, bias,
              running_mean, running_var, batch_stats, eps, unbiased, has_in):
    L = _Layer(x, unbiased, has_in, mean_logits)
    weights = _weights(mean_logits, var_logits, has_in)
    ln_stats = x.new_empty((2, L.n), dtype=STATS)
    bn_stats = x.new_zeros((2, L.c), dtype=STATS)
    if not L.has_bn:
        source, src_mean, src_var = 0, None, None
    elif batch_stats and batch_mean is None:
        source, src_mean, src_var = 1, None, None
    elif batch_stats:
        source, src_mean, src_var = 2, batch_mean, batch_var
    else:
        source, src_mean, src_var = 3, running_mean, running_var
    _statistics_kernel[L.stats_grid](
        mean_in, var_in, ln_stats, bn_stats, _or(src_mean, bn_stats), _or(src_var, bn_stats),
        _or(batch_count, bn_stats), L.n, float(L.n), L.c, L.ln_factor, SAMPLE_VARIANCES=L.sample_variances,
        BN_SOURCE=source, HAS_COUNT=batch_count is not None, BLOCK=L.block_c)
    y = torch.empty_like(x)
    if L.rows:
        _affine_kernel[L.row_grid](x, y, mean_in, var_in, ln_stats, bn_stats, weights, _or(weight, weights),
                                   _or(bias, weights), L.rows, L.n, L.c, L.s, eps, HAS_GAMMA=weight is not None,
                                   HAS_BETA=bias is not None, COMPUTE=L.compute, BLOCK_R=L.block_r,
                                   BLOCK_S=L.block_s)
    return y, ln_stats, bn_stats


def forward(x, mean_logits, var_logits, weight, bias, running_mean, running_var, batch_stats, eps, unbiased, has_in):
    mean_in, var_in = moments(x, unbiased)
    y, ln_stats, bn_stats = normalize(x, mean_in, var_in, None, None, None, mean_logits, var_logits, weight, bias,
                                      running_mean, running_var, batch_stats, eps, unbiased, has_in)
    if flat_sizes(x)[2] == 1:  # one value per (n, c): the means are x itself, nothing to keep (see ops.py)
        mean_in = mean_in.new_empty((x.shape[0], 0))
    return y, mean_in, ln_stats, bn_stats


def update_running_stats(running_mean, running_var, bn_stats, batch_count, num_samples, spatial_size, momentum,
                         unbiased):
    c = running_mean.numel()
    block = min(triton.next_power_of_2(max(c, 1)), 1024)
    _running_stats_kernel[(triton.cdiv(max(c, 1), block),)](
        running_mean, running_var, bn_stats, _or(batch_count, bn_stats), float(num_samples), spatial_size, c, momentum,
        HAS_COUNT=batch_count is not None, UNBIASED=unbiased, BLOCK=block)


def backward_reduce(grad_out, x, mean_in, ln_stats, bn_stats, batch_count, mean_logits, var_logits, weight,
                    batch_stats, eps, unbiased, has_in):
    L = _Layer(x, unbiased, has_in, mean_logits)
    weights = _weights(mean_logits, var_logits, has_in)
    per_row = x.new_zeros((11, L.n, L.c), dtype=STATS)
    if L.rows:
        _grad_rows_kernel[L.row_grid](grad_out, x, mean_in, ln_stats, bn_stats, weights, _or(weight, weights),
                                      per_row, L.rows, L.n, L.c, L.s, eps, L.inv_divisor,
                                      HAS_GAMMA=weight is not None, COMPUTE=L.compute, BLOCK_R=L.block_r,
                                      BLOCK_S=L.block_s)
    ln_grad = x.new_empty((2, L.n), dtype=STATS)
    bn_grad = x.new_empty((2, L.c), dtype=STATS)
    param_grads = x.new_empty((2, L.c), dtype=STATS)
    logit_part = x.new_zeros((max(L.n, 1), 6), dtype=STATS)
    _grad_reduce_kernel[L.stats_grid](per_row, ln_grad, bn_grad, param_grads[0], param_grads[1], logit_part,
                                      L.n, L.c, BLOCK=L.block_c)
    # the softmax backward: w_k * g_k (sum_j w_j g_j is 0)
    logits = (logit_part.sum(0).view(2, 3) * weights).to(mean_logits.dtype)
    k = mean_logits.numel()
    grad_weight, grad_bias = param_grads.to(mean_logits.dtype).unbind(0)
    return per_row[:3], ln_grad, bn_grad, logits[0, :k], logits[1, :k], grad_weight, grad_bias


def backward_dx(grad_out, x, mean_in, row_grads, ln_grad, bn_grad, ln_stats, bn_stats, batch_count, mean_logits,
                var_logits, weight, batch_stats, eps, unbiased, has_in):
    L = _Layer(x, unbiased, has_in, mean_logits)
    weights = _weights(mean_logits, var_logits, has_in)
    dx = torch.empty_like(x)
    if L.rows:
        _dx_kernel[L.row_grid](grad_out, x, dx, mean_in, row_grads, ln_stats, bn_stats, ln_grad, bn_grad, weights,
                               _or(weight, weights), _or(batch_count, weights), L.rows, L.n, float(L.n), L.c, L.s,
                               eps,
                               L.inv_s, L.inv_divisor, L.ln_factor, SAMPLE_VARIANCES=L.sample_variances,
                               BN_FROM_BATCH=L.has_bn and batch_stats, HAS_COUNT=batch_count is not None,
                               HAS_GAMMA=weight is not None, COMPUTE=L.compute, BLOCK_R=L.block_r,
                               BLOCK_S=L.block_s)
    return dx


def backward(grad_out, x, mean_in, ln_stats, bn_stats, mean_logits, var_logits, weight, batch_stats, eps, unbiased,
             has_in, input_grad):
    if flat_sizes(x)[2] == 1:  # forward kept no means: they are x
        mean_in = x.view(x.shape[0], x.shape[1]).to(STATS)
    row_grads, ln_grad, bn_grad, g_mean, g_var, g_weight, g_bias = backward_reduce(
        grad_out, x, mean_in, ln_stats, bn_stats, None, mean_logits, var_logits, weight, batch_stats, eps,
        unbiased, has_in)
    if input_grad:
        dx = backward_dx(grad_out, x, mean_in, row_grads.contiguous(), ln_grad, bn_grad, ln_stats, bn_stats, None,
                         mean_logits, var_logits, weight, batch_stats, eps, unbiased, has_in)
    else:
        dx = x.new_empty(0)
    return dx, g_mean, g_var, g_weight, g_bias
