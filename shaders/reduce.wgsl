// reduce.wgsl: deterministic reductions (a fixed strided order per invocation, then a fixed tree
// in workgroup memory; where one workgroup is not wide enough, per-slice partials and a final
// stage that adds them in a fixed order; no atomics), for gradients and losses.
//
//   group_sum:  y[b, c] = sum_{r, s} x[(r * B + b), c, s]      x: [N = R*B, C, S], y: [B, C]
//               (B = 1: per-channel sums, the bias gradients of conv/linear; B = batch: the
//               time-embedding gradient, summed over spiking steps and pixels). Grid [B*C, P]:
//               workgroup (o, q) sums slice q of the R*S values of output o = b*C + c (slices
//               of ceil(R*S / P) values, in order), into y[o] when P = 1, else into
//               part[o * P + q]; group_sum_vec4 is the same over vec4s when S % 4 == 0 (four
//               running sums per invocation, one per lane, added x + y + z + w at the end).
//   group_sum_final: y[o] = sum_{j < J} (sum_{q < P} part[(j * O + o) * P + q]), each row's P in
//               order, then the J rows in order (O = p.n outputs, P = p.s, J = p.b), one
//               invocation per output: group_sum's partials (J = 1), or channel partials a
//               producer wrote per block of images (J blocks feeding each output).
//   group_sum_spikes: group_sum (P = 1) over bit-packed spikes (element e at bit e % 32 of word
//               e / 32): spike counts, exact while a channel's count stays below 2^24
//   sumsq_acc:  acc[0] = acc[0] + sum_i x[i]^2 (or = when p.b = 1)                (one node per
//               tensor, serialised by the graph, so the total has a fixed order)
//   sumsq_partials: part[p.b + k] = sum of x^2 over chunk k of an arena (chunks[k] = (start, len)
//               in elements, start % 4 == 0, as src/graph/arena.rs makes them), vec4 loads, the
//               member's last partial vec4 masked; one workgroup per chunk (p.n chunks)
//   sumsq_final: y[0] = sum_{i < p.n} part[i] (one workgroup): the global gradient norm's sum of
//               squares, the same bits every run
//   mse_loss:   loss[0] = sum_i (a[i] - b[i])^2 / n            (loss.mean() of the reference)
//   mse_grad:   d[i] = 2 (a[i] - b[i]) / n * gloss[0]          (its gradient w.r.t. a)
// Grid: group_sum: [B * C, P]; group_sum_final and mse_grad: one invocation per output;
// sumsq_partials: one workgroup per chunk; the others one workgroup.

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

// Where group_sum's workgroup (o, q) writes: y[o] alone, or its slice's partial.
fn group_out(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x * nwg.y + wid.y;
}

// Workgroup (o, q)'s slice [lo, hi) of output o's R * len units (len units per row r), P =
// nwg.y slices of ceil(R * len / P) units.
fn group_slice(wid: vec3<u32>, nwg: vec3<u32>, len: u32) -> vec2<u32> {
    let m = (p.n / p.b) * len;
    let per = (m + nwg.y - 1u) / nwg.y;
    let lo = min(wid.y * per, m);
    return vec2<u32>(lo, min(lo + per, m));
}

@compute @workgroup_size(256)
fn group_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let out = wid.x;              // = b * C + c
    let bb = out / p.c;
    let ch = out % p.c;
    let range = group_slice(wid, nwg, p.s);
    var acc = 0.0;
    for (var e = range.x + lid; e < range.y; e += WG) {
        let r = e / p.s;
        acc += x[((r * p.b + bb) * p.c + ch) * p.s + e % p.s];
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u) {
        y[group_out(wid, nwg)] = total;
    }
}

@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn group_sum_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let out = wid.x;
    let bb = out / p.c;
    let ch = out % p.c;
    let s4 = p.s / 4u;
    let range = group_slice(wid, nwg, s4);
    var acc = vec4<f32>(0.0);
    for (var u = range.x + lid; u < range.y; u += WG) {
        let r = u / s4;
        acc += x4[((r * p.b + bb) * p.c + ch) * s4 + u % s4];
    }
    let total = workgroup_sum(lid, (acc.x + acc.y) + (acc.z + acc.w));
    if (lid == 0u) {
        y[group_out(wid, nwg)] = total;
    }
}

@compute @workgroup_size(256)
fn group_sum_final(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let o = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (o >= p.n) {
        return;
    }
    var acc = 0.0;
    for (var j = 0u; j < p.b; j++) {
        var row = 0.0;
        for (var q = 0u; q < p.s; q++) {
            row += x[(j * p.n + o) * p.s + q];
        }
        acc += row;
    }
    y[o] = acc;
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

@group(0) @binding(2) var<storage, read> chunks: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read_write> part: array<f32>;

@compute @workgroup_size(256)
fn sumsq_partials(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    // Uniform control flow for workgroup_sum: a workgroup past the table sums nothing.
    let k = wid.y * nwg.x + wid.x;
    var acc = vec4<f32>(0.0);
    if (k < p.n) {
        let chunk = chunks[k];
        let start = chunk.x / 4u;
        let units = (chunk.y + 3u) / 4u;
        for (var u = lid; u < units; u += WG) {
            let v = x4[start + u];
            // Lanes past the member's end (its last vec4 only) read padding: masked out.
            let live = vec4<u32>(4u * u) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(chunk.y);
            acc += select(vec4<f32>(0.0), v * v, live);
        }
    }
    let total = workgroup_sum(lid, (acc.x + acc.y) + (acc.z + acc.w));
    if (lid == 0u && k < p.n) {
        part[p.b + k] = total;
    }
}

@compute @workgroup_size(256)
fn sumsq_final(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        acc += x[i];
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u) {
        y[0] = total;
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
