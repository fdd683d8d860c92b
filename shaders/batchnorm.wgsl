// batchnorm.wgsl: BatchNorm2d over NCHW activations (N = T*B: spiking time folded into batch).
//
// Inference (running statistics):   y = x * alpha[c] + beta[c],
//   alpha = weight / sqrt(running_var + eps), beta = bias - running_mean * alpha
// (the same affine form PyTorch uses, so results agree to rounding).
//
// Training (batch statistics over N*H*W per channel), two kernels:
//   bn_stats:  mean = sum(x) / m, var = sum((x - mean)^2) / m (two passes, m = N*H*W),
//              invstd = 1 / sqrt(var + eps), saved for backward;
//              running_mean = (1 - momentum) * running_mean + momentum * mean,
//              running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1).
//   bn_train_apply: y = x * alpha + beta with alpha = weight * invstd, beta = bias - mean * alpha.
//   bn_train_apply_add: y = (x * alpha + beta) + r, the apply fused with the residual add that
//              follows it (same float operations as bn_train_apply then elementwise.wgsl's add, so
//              the same bits; the BN output is never written). 12 bytes per element instead of 20.
//   bn_train_apply_swish: y = swish(x * alpha + beta), swish(v) = v * (1 / (1 + exp(-v))) written
//              as elementwise.wgsl's swish writes it (8 bytes per element instead of 16);
//   bn_train_apply_swish_add: y = swish(x * alpha + beta) + r, then its residual add too.
//
// Backward of the training form (xhat = (x - mean) * invstd, m = N*H*W):
//   bn_backward_reduce: dweight[c] = sum(dy * xhat), dbias[c] = sum(dy)   (one workgroup per channel)
//   bn_backward_input:  dx = weight * invstd / m * (m * dy - dbias - xhat * dweight)
//   bn_swish_backward:  the gradient at BN's output of the fused Swish: v = x * alpha + beta
//              recomputed from x (which BN's backward keeps anyway), sg = 1 / (1 + exp(-v)),
//              dv = dy * (sg + v * sg * (1 - sg)) as elementwise.wgsl's swish_backward; BN's own
//              backward then runs on dv.
//
// Reductions are deterministic: one workgroup per channel, each invocation sums a fixed strided
// subset in order, then a fixed-shape tree in workgroup memory. No atomics.

struct Params {
    n: u32, c: u32, hw: u32, _pad: u32,
    eps: f32, momentum: f32, _pad1: u32, _pad2: u32,
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
    let alpha = weight[ch] * stat_var_or_invstd[ch];
    let beta = bias[ch] - stat_mean[ch] * alpha;
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
    let alpha = weight[ch] * stat_var_or_invstd[ch];
    let beta = bias[ch] - stat_mean[ch] * alpha;
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
    let alpha = weight[ch] * stat_var_or_invstd[ch];
    let beta = bias[ch] - stat_mean[ch] * alpha;
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
    let alpha = weight[ch] * stat_var_or_invstd[ch];
    let beta = bias[ch] - stat_mean[ch] * alpha;
    let o = swish(x[i] * alpha + beta);
    y_sum[i] = o + residual[i];
}

// ---- training statistics -------------------------------------------------------------------

@group(0) @binding(2) var<storage, read_write> out_mean: array<f32>;
@group(0) @binding(3) var<storage, read_write> out_invstd: array<f32>;
@group(0) @binding(4) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(5) var<storage, read_write> running_var: array<f32>;

// WG, partial and workgroup_sum come from common/tree_sum.wgsl.

@compute @workgroup_size(256)
fn bn_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let ch = wid.x;
    let m = p.n * p.hw;
    // Element e of this channel is x[(e / hw * c + ch) * hw + e % hw].
    var s = 0.0;
    for (var e = lid; e < m; e += WG) {
        s += x[((e / p.hw) * p.c + ch) * p.hw + e % p.hw];
    }
    let mean = workgroup_sum(lid, s) / f32(m);
    var q = 0.0;
    for (var e = lid; e < m; e += WG) {
        let d = x[((e / p.hw) * p.c + ch) * p.hw + e % p.hw] - mean;
        q += d * d;
    }
    let var_sum = workgroup_sum(lid, q);
    if (lid == 0u) {
        let var_biased = var_sum / f32(m);
        out_mean[ch] = mean;
        out_invstd[ch] = 1.0 / sqrt(var_biased + p.eps);
        let unbiased = var_sum / f32(max(m, 2u) - 1u);
        running_mean[ch] = (1.0 - p.momentum) * running_mean[ch] + p.momentum * mean;
        running_var[ch] = (1.0 - p.momentum) * running_var[ch] + p.momentum * unbiased;
    }
}

// ---- training backward -------------------------------------------------------------------

@group(0) @binding(1) var<storage, read> dy_b: array<f32>;
@group(0) @binding(2) var<storage, read> x_b: array<f32>;
@group(0) @binding(3) var<storage, read> mean_b: array<f32>;
@group(0) @binding(4) var<storage, read> invstd_b: array<f32>;
@group(0) @binding(5) var<storage, read_write> dweight: array<f32>;
@group(0) @binding(6) var<storage, read_write> dbias: array<f32>;

@compute @workgroup_size(256)
fn bn_backward_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let ch = wid.x;
    let m = p.n * p.hw;
    let mu = mean_b[ch];
    let inv = invstd_b[ch];
    var s_dy = 0.0;
    var s_dyx = 0.0;
    for (var e = lid; e < m; e += WG) {
        let i = ((e / p.hw) * p.c + ch) * p.hw + e % p.hw;
        let g = dy_b[i];
        s_dy += g;
        s_dyx += g * (x_b[i] - mu) * inv;
    }
    let total_dy = workgroup_sum(lid, s_dy);
    let total_dyx = workgroup_sum(lid, s_dyx);
    if (lid == 0u) {
        dweight[ch] = total_dyx;
        dbias[ch] = total_dy;
    }
}

@group(0) @binding(5) var<storage, read> weight_b: array<f32>;
@group(0) @binding(6) var<storage, read> dweight_in: array<f32>;
@group(0) @binding(7) var<storage, read> dbias_in: array<f32>;
@group(0) @binding(8) var<storage, read_write> dx_b: array<f32>;

@compute @workgroup_size(256)
fn bn_backward_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n * p.c * p.hw) {
        return;
    }
    let ch = (i / p.hw) % p.c;
    let m = f32(p.n * p.hw);
    let inv = invstd_b[ch];
    let xhat = (x_b[i] - mean_b[ch]) * inv;
    dx_b[i] = weight_b[ch] * inv / m * (m * dy_b[i] - dbias_in[ch] - xhat * dweight_in[ch]);
}

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
    let alpha = weight_b[ch] * invstd_b[ch];
    let beta = bias_b[ch] - mean_b[ch] * alpha;
    let v = x_b[i] * alpha + beta;
    let sg = 1.0 / (1.0 + exp(-v));
    dv_b[i] = dy_b[i] * (sg + v * sg * (1.0 - sg));
}
