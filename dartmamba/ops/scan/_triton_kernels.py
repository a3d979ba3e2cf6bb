"""Device code of the Triton selective scan (see :mod:`dartmamba.ops.scan.triton` for the design). Imported at
first use only: it needs triton, and ``TRITON_INTERPRET=1`` must be set before it is imported for the kernels to
run on CPU tensors.

Shapes: a program owns ``BLOCK_D`` channels of one batch row and one B/C group, and every state ``n < N``; it walks
the sequence in tiles of ``BLOCK_L`` steps. Tensors inside a tile are ``[BLOCK_D, BLOCK_N, BLOCK_L]``.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _affine(a1, b1, a2, b2):
    """Composition of x -> a1 x + b1 then x -> a2 x + b2 (also right for a reverse scan: Triton passes the part
    already scanned first)."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _step(raw, bias, SOFTPLUS: tl.constexpr):
    """delta + delta_bias, through softplus (torch's threshold 20: the identity above)."""
    x = raw + bias
    if SOFTPLUS:
        x = tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)
    return x


@triton.jit
def _program_channels(a_ptr, bias_ptr, dd_ptr, DIM, N, PER_GROUP, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The program's channels (grid: channel blocks, batch): its batch row, channels [D] and their mask, their B/C
    group, states [N] and masks, A [D, N], delta_bias and D [D] (zeros where absent)."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    group = (pid_d * BLOCK_D) // PER_GROUP
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(a_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    skip = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        skip = tl.load(dd_ptr + offs_d, mask=mask_d, other=0.0)
    return pid_b, offs_d, mask_d, group, offs_n, mask_n, mask_dn, A, bias, skip


@triton.jit
def _sequence_bases(u_ptr, dt_ptr, b_ptr, c_ptr, pid_b, offs_d, group, su_b, su_d, sdt_b, sdt_d, sb_b, sb_g,
                    sc_b, sc_g):
    """Where the program's sequences start: u and delta [D] (one row per channel), B and C (the group's slice)."""
    return (u_ptr + pid_b * su_b + offs_d * su_d, dt_ptr + pid_b * sdt_b + offs_d * sdt_d,
            b_ptr + pid_b * sb_b + group * sb_g, c_ptr + pid_b * sc_b + group * sc_g)


@triton.jit
def _tile(u_base, dt_base, b_base, c_base, mask_d, offs_n, mask_n, offs_l, mask_l, A2, bias,
          su_l, sdt_l, sb_n, sb_l, sc_n, sc_l, SOFTPLUS: tl.constexpr):
    """Load one tile and form the recurrence's terms: u, raw delta, dt [D, L]; B, C [N, L]; decay exp(dt A) and
    drive dt u B [D, N, L] (1 and 0 past the end, so the state passes through unchanged). ``u_base``,
    ``dt_base``: [D] pointers to the channels' rows; ``b_base``, ``c_base``: the group's (N, L) slice."""
    m2 = mask_d[:, None] & mask_l[None, :]
    u = tl.load(u_base[:, None] + offs_l[None, :] * su_l, mask=m2, other=0.0).to(tl.float32)
    raw = tl.load(dt_base[:, None] + offs_l[None, :] * sdt_l, mask=m2, other=0.0).to(tl.float32)
    dt = _step(raw, bias[:, None], SOFTPLUS)
    mbl = mask_n[:, None] & mask_l[None, :]
    Bt = tl.load(b_base + offs_n[:, None] * sb_n + offs_l[None, :] * sb_l, mask=mbl, other=0.0).to(tl.float32)
    Ct = tl.load(c_base + offs_n[:, None] * sc_n + offs_l[None, :] * sc_l, mask=mbl, other=0.0).to(tl.float32)
    valid = mask_l[None, None, :]
    decay = tl.where(valid, tl.exp2(dt[:, None, :] * A2[:, :, None]), 1.0)
    drive = tl.where(valid, (dt * u)[:, None, :] * Bt[None, :, :], 0.0)
    return u, raw, dt, Bt, Ct, decay, drive


@triton.jit
def scan_fwd_kernel(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, dd_ptr, z_ptr, bias_ptr, out_ptr, ckpt_ptr, last_ptr,
                    L, DIM, N, PER_GROUP, n_chunks,
                    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sb_b, sb_g, sb_n, sb_l, sc_b, sc_g, sc_n, sc_l,
                    sz_b, sz_d, sz_l,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_b, offs_d, mask_d, group, offs_n, mask_n, mask_dn, A, bias, skip = _program_channels(
        a_ptr, bias_ptr, dd_ptr, DIM, N, PER_GROUP, HAS_BIAS, HAS_D, BLOCK_D, BLOCK_N)
    A2 = A * LOG2E
    u_base, dt_base, b_base, c_base = _sequence_bases(u_ptr, dt_ptr, b_ptr, c_ptr, pid_b, offs_d, group,
                                                      su_b, su_d, sdt_b, sdt_d, sb_b, sb_g, sc_b, sc_g)
    out_base = out_ptr + (pid_b * DIM + offs_d) * L
    ckpt_base = ckpt_ptr + ((pid_b * DIM + offs_d[:, None]) * n_chunks) * N + offs_n[None, :]
    lanes = tl.arange(0, BLOCK_L)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for chunk in range(0, n_chunks):
        tl.store(ckpt_base + chunk * N, h, mask=mask_dn)            # the state entering this tile
        offs_l = chunk * BLOCK_L + lanes
        mask_l = offs_l < L
        u, raw, dt, Bt, Ct, decay, drive = _tile(u_base, dt_base, b_base, c_base, mask_d, offs_n, mask_n,
                                                 offs_l, mask_l, A2, bias, su_l, sdt_l, sb_n, sb_l, sc_n, sc_l,
                                                 SOFTPLUS)
        pa, pb = tl.associative_scan((decay, drive), 2, _affine)
        hs = pa * h[:, :, None] + pb                                 # h_t for every step of the tile
        y = tl.sum(hs * Ct[None, :, :], axis=1)
        if HAS_D:
            y += skip[:, None] * u
        m2 = mask_d[:, None] & mask_l[None, :]
        if HAS_Z:
            zt = tl.load(z_ptr + pid_b * sz_b + offs_d[:, None] * sz_d + offs_l[None, :] * sz_l, mask=m2,
                         other=0.0).to(tl.float32)
            y = y * zt * tl.sigmoid(zt)
        tl.store(out_base[:, None] + offs_l[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)
        h = tl.sum(tl.where(lanes[None, None, :] == BLOCK_L - 1, hs, 0.0), axis=2)   # past-the-end steps keep it
    tl.store(last_ptr + (pid_b * DIM + offs_d[:, None]) * N + offs_n[None, :], h, mask=mask_dn)


@triton.jit
def scan_bwd_kernel(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, dd_ptr, z_ptr, bias_ptr, ckpt_ptr, dout_ptr, dlast_ptr,
                    du_ptr, ddt_ptr, da_ptr, db_ptr, dc_ptr, ddd_ptr, dz_ptr, dbias_ptr,
                    L, DIM, N, PER_GROUP, G, n_chunks,
                    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sb_b, sb_g, sb_n, sb_l, sc_b, sc_g, sc_n, sc_l,
                    sz_b, sz_d, sz_l,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                    HAS_DLAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """Right to left over the tiles: the states of a tile recomputed from its checkpoint (a forward scan), the
    adjoint lambda_t = dL/dh_t = C_t dy_t + exp(dt_{t+1} A) lambda_{t+1} by a reverse scan carried across tiles.
    Per-channel sums (dA, dD, ddelta_bias) are written per batch row (summed on the host side, deterministic);
    dB, dC are sums over the group's channels: atomic adds into float32 (batch, G, N, L)."""
    pid_b, offs_d, mask_d, group, offs_n, mask_n, mask_dn, A, bias, skip = _program_channels(
        a_ptr, bias_ptr, dd_ptr, DIM, N, PER_GROUP, HAS_BIAS, HAS_D, BLOCK_D, BLOCK_N)
    A2 = A * LOG2E
    u_base, dt_base, b_base, c_base = _sequence_bases(u_ptr, dt_ptr, b_ptr, c_ptr, pid_b, offs_d, group,
                                                      su_b, su_d, sdt_b, sdt_d, sb_b, sb_g, sc_b, sc_g)
    row = (pid_b * DIM + offs_d) * L                                 # contiguous (batch, dim, L) buffers
    gbase = (pid_b * G + group) * N * L                              # float32 (batch, G, N, L) dB, dC
    ckpt_base = ckpt_ptr + ((pid_b * DIM + offs_d[:, None]) * n_chunks) * N + offs_n[None, :]
    lanes = tl.arange(0, BLOCK_L)
    if HAS_DLAST:
        carry = tl.load(dlast_ptr + (pid_b * DIM + offs_d[:, None]) * N + offs_n[None, :], mask=mask_dn,
                        other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for step in range(0, n_chunks):
        chunk = n_chunks - 1 - step
        h0 = tl.load(ckpt_base + chunk * N, mask=mask_dn, other=0.0)
        offs_l = chunk * BLOCK_L + lanes
        mask_l = offs_l < L
        m2 = mask_d[:, None] & mask_l[None, :]
        u, raw, dt, Bt, Ct, decay, drive = _tile(u_base, dt_base, b_base, c_base, mask_d, offs_n, mask_n,
                                                 offs_l, mask_l, A2, bias, su_l, sdt_l, sb_n, sb_l, sc_n, sc_l,
                                                 SOFTPLUS)
        pa, pb = tl.associative_scan((decay, drive), 2, _affine)
        hs = pa * h0[:, :, None] + pb
        dy = tl.load(dout_ptr + row[:, None] + offs_l[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            zt = tl.load(z_ptr + pid_b * sz_b + offs_d[:, None] * sz_d + offs_l[None, :] * sz_l, mask=m2,
                         other=0.0).to(tl.float32)
            sig = tl.sigmoid(zt)
            y = tl.sum(hs * Ct[None, :, :], axis=1)
            if HAS_D:
                y += skip[:, None] * u
            dz = dy * y * sig * (1.0 + zt * (1.0 - sig))
            tl.store(dz_ptr + row[:, None] + offs_l[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m2)
            dy = dy * zt * sig
        du = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=1)
            du = dy * skip[:, None]
        # alpha_t = exp(dt_{t+1} A): the next step's decay (1 after the last step, where lambda_L = dlast)
        nxt = offs_l + 1
        mask_nx = nxt < L
        raw_nx = tl.load(dt_base[:, None] + nxt[None, :] * sdt_l, mask=mask_d[:, None] & mask_nx[None, :],
                         other=0.0).to(tl.float32)
        dt_nx = _step(raw_nx, bias[:, None], SOFTPLUS)
        alpha = tl.where(mask_nx[None, None, :], tl.exp2(dt_nx[:, None, :] * A2[:, :, None]), 1.0)
        beta = tl.where(mask_l[None, None, :], Ct[None, :, :] * dy[:, None, :], 0.0)
        qa, qb = tl.associative_scan((alpha, beta), 2, _affine, reverse=True)
        lam = qa * carry[:, :, None] + qb                            # lambda_t for every step of the tile
        carry = tl.sum(tl.where(lanes[None, None, :] == 0, lam, 0.0), axis=2)
        dC = tl.sum(hs * dy[:, None, :], axis=0)                     # [N, L]
        dB = tl.sum(lam * (dt * u)[:, None, :], axis=0)
        mbl = mask_n[:, None] & mask_l[None, :]
        goff = gbase + offs_n[:, None] * L + offs_l[None, :]
        tl.atomic_add(dc_ptr + goff, dC, mask=mbl)
        tl.atomic_add(db_ptr + goff, dB, mask=mbl)
        ddrive = tl.sum(lam * Bt[None, :, :], axis=1)                # d(dt u) [D, L]
        # dL/d(dt A) = lambda_t exp(dt A) h_{t-1} = lambda_t (h_t - drive_t): no shifted state needed
        w = tl.where(mask_l[None, None, :], lam * (hs - drive), 0.0)
        dA_acc += tl.sum(w * dt[:, None, :], axis=2)
        ddt = ddrive * u + tl.sum(w * A[:, :, None], axis=1)
        du += ddrive * dt
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw + bias[:, None])
        ddt = tl.where(m2, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + row[:, None] + offs_l[None, :], du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddt_ptr + row[:, None] + offs_l[None, :], ddt.to(ddt_ptr.dtype.element_ty), mask=m2)
    part = pid_b * DIM + offs_d                                      # float32 (batch, dim[, N]) partial sums
    tl.store(da_ptr + part[:, None] * N + offs_n[None, :], dA_acc, mask=mask_dn)
    tl.store(ddd_ptr + part, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + part, dbias_acc, mask=mask_d)
