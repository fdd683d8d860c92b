// batchnorm.wgsl: BatchNorm2d over NCHW activations (N = T*B: spiking time folded into batch).
//
// Inference (running statistics):   y = x * alpha[c] + beta[c],
//   alpha = weight / sqrt(running_var + eps), beta = bias - running_mean * alpha
// (the same affine form PyTorch uses, so results agree to rounding).
//
// Training (batch statistics over N*H*W per channel, or per group of the batch, see "channel
// slices" below), statistics then apply:
//   bn_stats:  mean = sum(x) / m, var = sum((x - mean)^2) / m (two passes, m = N*H*W),
//              invstd = 1 / sqrt(var + eps), saved for backward with weight * invstd;
//              running_mean = (1 - momentum) * running_mean + momentum * mean,
//              running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1);
//              where a channel is too much for one workgroup, per-slice partials merged by
//              bn_stats_final.
//   bn_train_apply: y = x * alpha + beta with alpha = weight * invstd, beta = bias - mean * alpha
//              (mean and invstd of the element's group: stat_index).
//   bn_train_apply_add: y = (x * alpha + beta) + r, the apply fused with the residual add that
//              follows it (same float operations as bn_train_apply then elementwise.wgsl's add, so
//              the same bits; the BN output is never written). 12 bytes per element instead of 20.
//   bn_train_apply_swish: y = swish(x * alpha + beta), swish(v) = v * (1 / (1 + exp(-v))) written
//              as elementwise.wgsl's swish writes it (8 bytes per element instead of 16);
//   bn_train_apply_swish_add: y = swish(x * alpha + beta) + r, then its residual add too.
//
// Backward of the training form (xhat = (x - mean) * invstd, m = N*H*W):
//   bn_backward_reduce: per-slice sums of dy * xhat and dy (dweight, dbias)
//   bn_backward_input:  dx = weight * invstd / m * (m * dy - dbias - xhat * dweight), with the
//              slice sums added up in every workgroup (no pass of its own), the parameter
//              gradients written, and dx's channel sums left for a bias gradient
//   bn_swish_backward:  the gradient at BN's output of the fused Swish: v = x * alpha + beta
//              recomputed from x (which BN's backward keeps anyway), sg = 1 / (1 + exp(-v)),
//              dv = dy * (sg + v * sg * (1 - sg)) as elementwise.wgsl's swish_backward; BN's own
//              backward then runs on dv.
//
// Reductions are deterministic: (channel x slice) workgroups, each invocation sums a fixed
// strided subset in order, then a fixed-shape tree in workgroup memory, partials merged in a
// fixed order. No atomics.
//
// Params: n samples of c channels of hw values; groups BatchNorm groups of a batch of `batch`
// images per step (1 and n: plain BatchNorm); slices P of the training reductions' grid (P = 1:
// one workgroup per channel and group).

struct Params {
    n: u32, c: u32, hw: u32, groups: u32,
    eps: f32, momentum: f32, batch: u32, slices: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// ---- inference ----------------------------------------------------------------------------

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> stat_mean: array<f32>;
@group(0) @binding(5) var<storage, read> stat_var_or_invstd: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid;
}

// Index of the statistics of flat element i in training: g * C + ch for its BatchNorm group g
// (image (sample % batch) of its step, groups of batch / groups consecutive images); the channel
// with one group. Inference has one group.
fn stat_index(i: u32) -> u32 {
    let ch = (i / p.hw) % p.c;
    if (p.groups == 1u) {
        return ch;
    }
    let img = (i / (p.hw * p.c)) % p.batch;
    return img / (p.batch / p.groups) * p.c + ch;
}

@compute @workgroup_size(256)
fn bn_eval(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n * p.c * p.hw) {
        return;
    }
    let ch = (i / p.hw) % p.c;
    let alpha = weight[ch] / sqrt(stat_var_or_invstd[ch] + p.eps);
    let beta = bias[ch] - stat_mean[ch] * alpha;
    y[i] = x[i] * alpha + beta;
}

@compute @workgroup_size(256)
fn bn_train_apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n * p.c * p.hw) {
        return;
    }
    let ch = (i / p.hw) % p.c;
    let st = stat_index(i);
    let alpha = weight[ch] * stat_var_or_invstd[st];
    let beta = bias[ch] - stat_mean[st] * alpha;
    y[i] = x[i] * alpha + beta;
}

@group(0) @binding(6) var<storage, read> residual: array<f32>;
@group(0) @binding(7) var<storage, read_write> y_sum: array<f32>;

@compute @workgroup_size(256)
fn bn_train_apply_add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n * p.c * p.hw) {
        return;
    }
    let ch = (i / p.hw) % p.c;
    let st = stat_index(i);
    let alpha = weight[ch] * stat_var_or_invstd[st];
    let beta = bias[ch] - stat_mean[st] * alpha;
    let bn = x[i] * alpha + beta;
    y_sum[i] = bn + residual[i];
}

fn swish(v: f32) -> f32 {
    return v * (1.0 / (1.0 + exp(-v)));
}

@compute @workgroup_size(256)
fn bn_train_apply_swish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n * p.c * p.hw) {
        return;
    }
    let ch = (i / p.hw) % p.c;
    let st = stat_index(i);
    let alpha = weight[ch] * stat_var_or_invstd[st];
    let beta = bias[ch] - stat_mean[st] * alpha;
    y[i] = swish(x[i] * alpha + beta);
}

@compute @workgroup_size(256)
fn bn_train_apply_swish_add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n * p.c * p.hw) {
        return;
    }
    let ch = (i / p.hw) % p.c;
    let st = stat_index(i);
    let alpha = weight[ch] * stat_var_or_invstd[st];
    let beta = bias[ch] - stat_mean[st] * alpha;
    let o = swish(x[i] * alpha + beta);
    y_sum[i] = o + residual[i];
}

// ---- training: channel slices ------------------------------------------------------------------
//
// The training reductions visit the values of channel ch in BatchNorm group g (p.groups groups of
// S = p.batch / p.groups consecutive images of every spiking step; one group: the whole batch) in
// group order: row r = 0 .. N / groups - 1 (the group's samples, step by step), then pixel; with
// one group that is plain sample order. A [C, groups * P] grid gives workgroup (ch, g * P + q)
// slice q: P slices of ceil(U / P) units, U = the group's values / w, w = 4 in the _vec4 entries
// (HW % 4 == 0: vec4 loads) and 1 in the others; invocation lid sums units lid, lid + 256, ...
// of its slice in order, then a fixed tree in workgroup memory. Statistics and gradients of group
// g, channel ch sit at st = g * C + ch; partials of slice q at st * P + q. reduce.wgsl's
// group_sum cuts and visits [N, C, HW] the same way, so the channel sums bn_backward_input leaves
// of its output (one group) are bit for bit what group_sum would compute from it.

// Values of one channel in one group.
fn group_values() -> u32 {
    return p.n / p.groups * p.hw;
}

// Sample index of row r of group g.
fn group_sample(g: u32, r: u32) -> u32 {
    if (p.groups == 1u) {
        return r;
    }
    let s = p.batch / p.groups;
    return (r / s) * p.batch + g * s + r % s;
}

// Flat index of the first of the w values of unit u of channel ch in group g.
fn unit_at(ch: u32, g: u32, u: u32, w: u32) -> u32 {
    let per_row = p.hw / w;
    return (group_sample(g, u / per_row) * p.c + ch) * p.hw + (u % per_row) * w;
}

// Units [lo, hi) of slice q of `slices` over `units`.
fn slice_range(q: u32, slices: u32, units: u32) -> vec2<u32> {
    let per = (units + slices - 1u) / slices;
    let lo = min(q * per, units);
    return vec2<u32>(lo, min(lo + per, units));
}

struct Slice {
    ch: u32, g: u32, q: u32, slices: u32,
    lo: u32, hi: u32,
    // Index of the slice's statistics and gradients: g * C + ch.
    st: u32,
}

fn slice_of(wid: vec3<u32>, nwg: vec3<u32>, w: u32) -> Slice {
    let slices = nwg.y / p.groups;
    let g = wid.y / slices;
    let q = wid.y % slices;
    let r = slice_range(q, slices, group_values() / w);
    return Slice(wid.x, g, q, slices, r.x, r.y, g * p.c + wid.x);
}

// Mean, invstd and weight * invstd of every (group, channel) live in one tensor (an arena of
// three members, each at a multiple of 64 values): index k * stat_stride() + st.
fn stat_stride() -> u32 {
    return (p.groups * p.c + 63u) / 64u * 64u;
}

// ---- training statistics -------------------------------------------------------------------
//
//   bn_stats (P = 1, grid [C, groups]): the group's mean and sum of squared deviations (two
//       passes), finished in place; with one group the order (and the bits) of the one kernel
//       per channel this replaced.
//   bn_stats_partials (P > 1, grid [C, groups * P]): each slice's (mean, sum of squared
//       deviations) over its own values (two passes over the slice);
//   bn_stats_final (one invocation per (group, channel)): the P slices merged in order (Chan et
//       al.'s pairwise update: n = na + nb, d = mean_b - mean_a, mean += d * nb / n, M2 += M2_b +
//       d^2 * na * nb / n), then finished.
// Finishing: mean, var = M2 / m, invstd = 1 / sqrt(var + eps), weight * invstd (for the
// backward), and from group 0 the running statistics. Scalar loads (w = 1), unlike the backward:
// the spikes after BN flip on the statistics' last bits, and vec4 sums round differently.

@group(0) @binding(2) var<storage, read> weight_s: array<f32>;
@group(0) @binding(3) var<storage, read_write> stats_out: array<f32>;
@group(0) @binding(4) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(5) var<storage, read_write> running_var: array<f32>;
@group(0) @binding(2) var<storage, read_write> stat_parts: array<vec2<f32>>;
@group(0) @binding(1) var<storage, read> stat_parts_in: array<vec2<f32>>;

// WG, partial and workgroup_sum come from common/tree_sum.wgsl.

// (mean, sum of squared deviations) of the slice's values.
fn moments(sl: Slice, lid: u32) -> vec2<f32> {
    let count = sl.hi - sl.lo;
    var s = 0.0;
    for (var u = sl.lo + lid; u < sl.hi; u += WG) {
        s += x[unit_at(sl.ch, sl.g, u, 1u)];
    }
    let mean = workgroup_sum(lid, s) / f32(max(count, 1u));
    var q = 0.0;
    for (var u = sl.lo + lid; u < sl.hi; u += WG) {
        let d = x[unit_at(sl.ch, sl.g, u, 1u)] - mean;
        q += d * d;
    }
    return vec2<f32>(mean, workgroup_sum(lid, q));
}

// Statistics st of group g, channel ch from the mean and sum of squared deviations of its m values.
fn finish_stats(st: u32, ch: u32, g: u32, mean: f32, var_sum: f32) {
    let m = group_values();
    let stride = stat_stride();
    let invstd = 1.0 / sqrt(var_sum / f32(m) + p.eps);
    stats_out[st] = mean;
    stats_out[stride + st] = invstd;
    stats_out[2u * stride + st] = weight_s[ch] * invstd;
    if (g == 0u) {
        let unbiased = var_sum / f32(max(m, 2u) - 1u);
        running_mean[ch] = (1.0 - p.momentum) * running_mean[ch] + p.momentum * mean;
        running_var[ch] = (1.0 - p.momentum) * running_var[ch] + p.momentum * unbiased;
    }
}

@compute @workgroup_size(256)
fn bn_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let sl = slice_of(wid, nwg, 1u);
    let mv = moments(sl, lid);
    if (lid == 0u) {
        finish_stats(sl.st, sl.ch, sl.g, mv.x, mv.y);
    }
}

@compute @workgroup_size(256)
fn bn_stats_partials(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let sl = slice_of(wid, nwg, 1u);
    let mv = moments(sl, lid);
    if (lid == 0u) {
        stat_parts[sl.st * sl.slices + sl.q] = mv;
    }
}

@compute @workgroup_size(256)
fn bn_stats_final(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let st = flat_index(wid, nwg, lid);
    if (st >= p.groups * p.c) {
        return;
    }
    let units = group_values();
    var n_a = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    for (var q = 0u; q < p.slices; q++) {
        let r = slice_range(q, p.slices, units);
        let n_b = f32(r.y - r.x);
        if (n_b > 0.0) {
            let part = stat_parts_in[st * p.slices + q];
            let n = n_a + n_b;
            let d = part.x - mean;
            mean = mean + d * (n_b / n);
            m2 = m2 + part.y + d * d * (n_a * n_b / n);
            n_a = n;
        }
    }
    finish_stats(st, st % p.c, st / p.c, mean, m2);
}

// ---- training backward -------------------------------------------------------------------
//
// xhat = (x - mean) * invstd, m = the group's value count, sums over the group's values:
//   bn_backward_reduce[_vec4] (grid [C, groups * P]): each slice's (sum dy, sum dy * xhat);
//   bn_backward_input[_vec4] (the same grid): dbias_g = sum of its group's P sums of dy,
//       dweight_g = of dy * xhat (in slice order, in every workgroup alike), then
//       dx = weight * invstd / m * (m * dy - dbias_g - xhat * dweight_g) over its slice; it also
//       leaves the slice's sum of dx (for a bias gradient of dx), and workgroup (ch, 0) writes
//       the parameter gradients dweight = sum over groups of dweight_g (in group order), dbias
//       likewise;
//   bn_backward_final (one invocation per channel; when dx is not wanted): those parameter
//       gradients alone.

@group(0) @binding(1) var<storage, read> dy_b: array<f32>;
@group(0) @binding(2) var<storage, read> x_b: array<f32>;
@group(0) @binding(3) var<storage, read> stats_b: array<f32>;
@group(0) @binding(4) var<storage, read_write> bwd_parts: array<vec2<f32>>;
@group(0) @binding(1) var<storage, read> dy4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> xb4: array<vec4<f32>>;

// (sum dy, sum dy * xhat) of the slice.
fn backward_sums(sl: Slice, lid: u32) -> vec2<f32> {
    let mu = stats_b[sl.st];
    let inv = stats_b[stat_stride() + sl.st];
    var s_dy = 0.0;
    var s_dyx = 0.0;
    for (var u = sl.lo + lid; u < sl.hi; u += WG) {
        let i = unit_at(sl.ch, sl.g, u, 1u);
        let g = dy_b[i];
        s_dy += g;
        s_dyx += g * (x_b[i] - mu) * inv;
    }
    return vec2<f32>(workgroup_sum(lid, s_dy), workgroup_sum(lid, s_dyx));
}

fn backward_sums4(sl: Slice, lid: u32) -> vec2<f32> {
    let mu = vec4<f32>(stats_b[sl.st]);
    let inv = stats_b[stat_stride() + sl.st];
    var s_dy = vec4<f32>(0.0);
    var s_dyx = vec4<f32>(0.0);
    for (var u = sl.lo + lid; u < sl.hi; u += WG) {
        let i = unit_at(sl.ch, sl.g, u, 4u) / 4u;
        let g = dy4[i];
        s_dy += g;
        s_dyx += g * (xb4[i] - mu) * inv;
    }
    let total_dy = workgroup_sum(lid, (s_dy.x + s_dy.y) + (s_dy.z + s_dy.w));
    return vec2<f32>(total_dy, workgroup_sum(lid, (s_dyx.x + s_dyx.y) + (s_dyx.z + s_dyx.w)));
}

@compute @workgroup_size(256)
fn bn_backward_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let sl = slice_of(wid, nwg, 1u);
    let sums = backward_sums(sl, lid);
    if (lid == 0u) {
        bwd_parts[sl.st * sl.slices + sl.q] = sums;
    }
}

@compute @workgroup_size(256)
fn bn_backward_reduce_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let sl = slice_of(wid, nwg, 4u);
    let sums = backward_sums4(sl, lid);
    if (lid == 0u) {
        bwd_parts[sl.st * sl.slices + sl.q] = sums;
    }
}

@group(0) @binding(4) var<storage, read> bwd_parts_in: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read_write> dx_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> dx_parts: array<f32>;
@group(0) @binding(7) var<storage, read_write> dweight_out: array<f32>;
@group(0) @binding(8) var<storage, read_write> dbias_out: array<f32>;

// (dbias_g, dweight_g) of statistic st: its P slice sums in order.
fn group_grads(st: u32, slices: u32) -> vec2<f32> {
    var acc = vec2<f32>(0.0);
    for (var q = 0u; q < slices; q++) {
        let s = bwd_parts_in[st * slices + q];
        acc = vec2<f32>(acc.x + s.x, acc.y + s.y);
    }
    return acc;
}

// The parameter gradients of channel ch: the groups' in group order.
fn write_param_grads(ch: u32, slices: u32) {
    var db = 0.0;
    var dw = 0.0;
    for (var g = 0u; g < p.groups; g++) {
        let s = group_grads(g * p.c + ch, slices);
        db += s.x;
        dw += s.y;
    }
    dweight_out[ch] = dw;
    dbias_out[ch] = db;
}

// dx of one value: dy, x, the slice's (mean, invstd, weight * invstd) and (dbias_g, dweight_g).
fn dx_of(dy: f32, xv: f32, k: vec3<f32>, gr: vec2<f32>, m: f32) -> f32 {
    let xhat = (xv - k.x) * k.y;
    return k.z / m * (m * dy - gr.x - xhat * gr.y);
}

fn slice_coeffs(sl: Slice) -> vec3<f32> {
    let stride = stat_stride();
    return vec3<f32>(stats_b[sl.st], stats_b[stride + sl.st], stats_b[2u * stride + sl.st]);
}

@compute @workgroup_size(256)
fn bn_backward_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let sl = slice_of(wid, nwg, 1u);
    let gr = group_grads(sl.st, sl.slices);
    let k = slice_coeffs(sl);
    let m = f32(group_values());
    var acc = 0.0;
    for (var u = sl.lo + lid; u < sl.hi; u += WG) {
        let i = unit_at(sl.ch, sl.g, u, 1u);
        let d = dx_of(dy_b[i], x_b[i], k, gr, m);
        dx_out[i] = d;
        acc += d;
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u) {
        dx_parts[sl.st * sl.slices + sl.q] = total;
        if (wid.y == 0u) {
            write_param_grads(sl.ch, sl.slices);
        }
    }
}

@compute @workgroup_size(256)
fn bn_backward_input_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let sl = slice_of(wid, nwg, 4u);
    let gr = group_grads(sl.st, sl.slices);
    let k = slice_coeffs(sl);
    let m = f32(group_values());
    var acc = vec4<f32>(0.0);
    for (var u = sl.lo + lid; u < sl.hi; u += WG) {
        let i = unit_at(sl.ch, sl.g, u, 4u) / 4u;
        let g = dy4[i];
        let xv = xb4[i];
        let d = vec4<f32>(dx_of(g.x, xv.x, k, gr, m), dx_of(g.y, xv.y, k, gr, m), dx_of(g.z, xv.z, k, gr, m),
                          dx_of(g.w, xv.w, k, gr, m));
        dx4[i] = d;
        acc += d;
    }
    let total = workgroup_sum(lid, (acc.x + acc.y) + (acc.z + acc.w));
    if (lid == 0u) {
        dx_parts[sl.st * sl.slices + sl.q] = total;
        if (wid.y == 0u) {
            write_param_grads(sl.ch, sl.slices);
        }
    }
}

@group(0) @binding(1) var<storage, read> final_parts: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> final_dweight: array<f32>;
@group(0) @binding(3) var<storage, read_write> final_dbias: array<f32>;

@compute @workgroup_size(256)
fn bn_backward_final(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let ch = flat_index(wid, nwg, lid);
    if (ch >= p.c) {
        return;
    }
    var db = 0.0;
    var dw = 0.0;
    for (var g = 0u; g < p.groups; g++) {
        var acc = vec2<f32>(0.0);
        let st = g * p.c + ch;
        for (var q = 0u; q < p.slices; q++) {
            let s = final_parts[st * p.slices + q];
            acc = vec2<f32>(acc.x + s.x, acc.y + s.y);
        }
        db += acc.x;
        dw += acc.y;
    }
    final_dweight[ch] = dw;
    final_dbias[ch] = db;
}

// ---- fused Swish backward -----------------------------------------------------------------

@group(0) @binding(3) var<storage, read> mean_b: array<f32>;
@group(0) @binding(4) var<storage, read> invstd_b: array<f32>;
@group(0) @binding(5) var<storage, read> weight_b: array<f32>;
@group(0) @binding(6) var<storage, read> bias_b: array<f32>;
@group(0) @binding(7) var<storage, read_write> dv_b: array<f32>;

@compute @workgroup_size(256)
fn bn_swish_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n * p.c * p.hw) {
        return;
    }
    let ch = (i / p.hw) % p.c;
    let st = stat_index(i);
    let alpha = weight_b[ch] * invstd_b[st];
    let beta = bias_b[ch] - mean_b[st] * alpha;
    let v = x_b[i] * alpha + beta;
    let sg = 1.0 / (1.0 + exp(-v));
    dv_b[i] = dy_b[i] * (sg + v * sg * (1.0 - sg));
}
