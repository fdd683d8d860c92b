// reduce.wgsl: deterministic reductions (one workgroup per output, a fixed strided order per
// invocation, then a fixed tree in workgroup memory; no atomics), for gradients and losses.
//
//   group_sum:  y[b, c] = sum_{r, s} x[(r * B + b), c, s]      x: [N = R*B, C, S], y: [B, C]
//               (B = 1: per-channel sums, the bias gradients of conv/linear; B = batch: the
//               time-embedding gradient, summed over spiking steps and pixels)
//   group_sum_spikes: the same over bit-packed spikes (element e at bit e % 32 of word e / 32):
//               spike counts, exact while a channel's count stays below 2^24
//   sumsq_acc:  acc[0] = acc[0] + sum_i x[i]^2 (or = when p.b = 1)                (the global gradient norm: one
//               node per parameter, serialised by the graph, so the total has a fixed order)
//   mse_loss:   loss[0] = sum_i (a[i] - b[i])^2 / n            (loss.mean() of the reference)
//   mse_grad:   d[i] = 2 (a[i] - b[i]) / n * gloss[0]          (its gradient w.r.t. a)
// Grid: group_sum: x = B * C workgroups; the others one workgroup.

struct Params {
    n: u32, c: u32, s: u32, b: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@group(0) @binding(1) var<storage, read> x_bits: array<u32>;
@group(0) @binding(2) var<storage, read> b_in: array<f32>;
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;

// WG, partial and workgroup_sum come from common/tree_sum.wgsl.

@compute @workgroup_size(256)
fn group_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let out = wid.x;              // = b * C + c
    let bb = out / p.c;
    let ch = out % p.c;
    let reps = p.n / p.b;
    let m = reps * p.s;
    var acc = 0.0;
    for (var e = lid; e < m; e += WG) {
        let r = e / p.s;
        acc += x[((r * p.b + bb) * p.c + ch) * p.s + e % p.s];
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u) {
        y[out] = total;
    }
}

@compute @workgroup_size(256)
fn group_sum_spikes(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let out = wid.x;
    let bb = out / p.c;
    let ch = out % p.c;
    let reps = p.n / p.b;
    let m = reps * p.s;
    var acc = 0.0;
    for (var e = lid; e < m; e += WG) {
        let r = e / p.s;
        let i = ((r * p.b + bb) * p.c + ch) * p.s + e % p.s;
        acc += f32((x_bits[i / 32u] >> (i % 32u)) & 1u);
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u) {
        y[out] = total;
    }
}

@compute @workgroup_size(256)
fn sumsq_acc(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        acc += x[i] * x[i];
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u) {
        // p.b = 1 marks the first node of the chain: it starts the sum instead of adding to it.
        y[0] = select(y[0] + total, total, p.b == 1u);
    }
}

@compute @workgroup_size(256)
fn mse_loss(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        let d = x[i] - b_in[i];
        acc += d * d;
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u) {
        loss[0] = total / f32(p.n);
    }
}

@group(0) @binding(3) var<storage, read> gloss: array<f32>;
@group(0) @binding(4) var<storage, read_write> d_out: array<f32>;

@compute @workgroup_size(256)
fn mse_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.n) {
        return;
    }
    d_out[i] = 2.0 * (x[i] - b_in[i]) / f32(p.n) * gloss[0];
}
