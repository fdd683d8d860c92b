// groupnorm.wgsl: GroupNorm over [B, C, S] activations (S = H*W), G groups of C/G channels, with
// an optional Swish fused into the apply (pytorch-ddpm's GroupNorm(32) -> Swish pairs).
//
//   gn_stats:  per (b, g): mean = sum(x) / m, var = sum((x - mean)^2) / m over the group's
//              m = (C/G)*S contiguous values (two passes), invstd = 1 / sqrt(var + eps).
//   gn_apply:        y = z,          z = (x - mean) * invstd * weight[c] + bias[c]
//   gn_apply_swish:  y = z * sigmoid(z)
//
// Backward (xhat = (x - mean) * invstd; dz = dy, or dy * (sg + z sg (1 - sg)) with the Swish
// fused, z recomputed from x and the saved statistics):
//   gn_backward_group: per (b, g): s1 = sum(dz * weight[c]), s2 = sum(dz * weight[c] * xhat)
//   gn_backward_param: per c: dweight = sum_{b,s}(dz * xhat), dbias = sum_{b,s}(dz)
//   gn_backward_input: dx = invstd * (dz * weight[c] - s1 / m - xhat * s2 / m)
//
// Reductions are deterministic: one workgroup per group (or channel), each invocation sums a fixed
// strided subset in order, then a fixed-shape tree (common/tree_sum.wgsl). No atomics.

struct Params {
    b: u32, c: u32, s: u32, groups: u32,
    eps: f32, swish: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

fn sigmoid(v: f32) -> f32 {
    return 1.0 / (1.0 + exp(-v));
}

// ---- statistics ----------------------------------------------------------------------------

@group(0) @binding(1) var<storage, read> x_s: array<f32>;
@group(0) @binding(2) var<storage, read_write> out_mean: array<f32>;
@group(0) @binding(3) var<storage, read_write> out_invstd: array<f32>;

// WG, partial and workgroup_sum come from common/tree_sum.wgsl.

@compute @workgroup_size(256)
fn gn_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let bg = wid.x;
    let m = p.c / p.groups * p.s;
    let base = bg * m;
    var s = 0.0;
    for (var e = lid; e < m; e += WG) {
        s += x_s[base + e];
    }
    let mean = workgroup_sum(lid, s) / f32(m);
    var q = 0.0;
    for (var e = lid; e < m; e += WG) {
        let d = x_s[base + e] - mean;
        q += d * d;
    }
    let var_sum = workgroup_sum(lid, q);
    if (lid == 0u) {
        out_mean[bg] = mean;
        out_invstd[bg] = 1.0 / sqrt(var_sum / f32(m) + p.eps);
    }
}

// ---- apply ---------------------------------------------------------------------------------

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> mean: array<f32>;
@group(0) @binding(5) var<storage, read> invstd: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

// z for element i: its channel and (b, g) group.
fn affine(i: u32) -> f32 {
    let ch = (i / p.s) % p.c;
    let bg = i / (p.c / p.groups * p.s);
    return (x[i] - mean[bg]) * invstd[bg] * weight[ch] + bias[ch];
}

@compute @workgroup_size(256)
fn gn_apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.b * p.c * p.s) {
        return;
    }
    let z = affine(i);
    if (p.swish != 0u) {
        y[i] = z * sigmoid(z);
    } else {
        y[i] = z;
    }
}

// ---- backward ------------------------------------------------------------------------------

@group(0) @binding(1) var<storage, read> dy_b: array<f32>;
@group(0) @binding(2) var<storage, read> x_b: array<f32>;
@group(0) @binding(3) var<storage, read> weight_b: array<f32>;
@group(0) @binding(4) var<storage, read> bias_b: array<f32>;
@group(0) @binding(5) var<storage, read> mean_b: array<f32>;
@group(0) @binding(6) var<storage, read> invstd_b: array<f32>;
@group(0) @binding(7) var<storage, read_write> out_a: array<f32>;
@group(0) @binding(8) var<storage, read_write> out_b: array<f32>;
@group(0) @binding(7) var<storage, read> sums_in: array<f32>;
@group(0) @binding(8) var<storage, read_write> dx_out: array<f32>;

// (dz, xhat) of element i.
fn grad_z(i: u32) -> vec2<f32> {
    let ch = (i / p.s) % p.c;
    let bg = i / (p.c / p.groups * p.s);
    let xhat = (x_b[i] - mean_b[bg]) * invstd_b[bg];
    var dz = dy_b[i];
    if (p.swish != 0u) {
        let z = xhat * weight_b[ch] + bias_b[ch];
        let sg = sigmoid(z);
        dz = dz * (sg + z * sg * (1.0 - sg));
    }
    return vec2<f32>(dz, xhat);
}

// out_a: [B*G, 2] as (s1, s2) pairs.
@compute @workgroup_size(256)
fn gn_backward_group(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let bg = wid.x;
    let m = p.c / p.groups * p.s;
    let base = bg * m;
    var s1 = 0.0;
    var s2 = 0.0;
    for (var e = lid; e < m; e += WG) {
        let i = base + e;
        let gz = grad_z(i);
        let dzw = gz.x * weight_b[(i / p.s) % p.c];
        s1 += dzw;
        s2 += dzw * gz.y;
    }
    let t1 = workgroup_sum(lid, s1);
    let t2 = workgroup_sum(lid, s2);
    if (lid == 0u) {
        out_a[2u * bg] = t1;
        out_a[2u * bg + 1u] = t2;
    }
}

// out_a[c] = dweight, out_b[c] = dbias.
@compute @workgroup_size(256)
fn gn_backward_param(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let ch = wid.x;
    let m = p.b * p.s;
    var sw = 0.0;
    var sb = 0.0;
    for (var e = lid; e < m; e += WG) {
        let gz = grad_z(((e / p.s) * p.c + ch) * p.s + e % p.s);
        sw += gz.x * gz.y;
        sb += gz.x;
    }
    let tw = workgroup_sum(lid, sw);
    let tb = workgroup_sum(lid, sb);
    if (lid == 0u) {
        out_a[ch] = tw;
        out_b[ch] = tb;
    }
}

// sums_in: [B*G, 2] as (s1, s2) pairs.
@compute @workgroup_size(256)
fn gn_backward_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.b * p.c * p.s) {
        return;
    }
    let m = f32(p.c / p.groups * p.s);
    let bg = i / (p.c / p.groups * p.s);
    let gz = grad_z(i);
    let w = weight_b[(i / p.s) % p.c];
    dx_out[i] = invstd_b[bg] * (gz.x * w - sums_in[2u * bg] / m - gz.y * sums_in[2u * bg + 1u] / m);
}
