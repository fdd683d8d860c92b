// attention.wgsl: fused softmax self-attention over the N = H*W positions of an image, as
// pytorch-ddpm's AttnBlock after its 1x1 q/k/v convs. q, k, v, o: [B, C, N] (NCHW), scale = C^-0.5:
//
//   s[i, j] = scale * sum_c q[c, i] k[c, j],   P = softmax_j(s),   o[c, i] = sum_j P[i, j] v[c, j]
//
// attn_forward: one workgroup per (query i, image b). Keys are visited in tiles of AT with an
// online softmax (running max m and denominator l, the accumulator rescaled by exp(m_old - m_new)),
// so the N x N matrix never exists; also writes lse[b, i] = m + log(l) for the backward.
//
// Backward (flash-attention style: P recomputed from lse; D[i] = sum_c do[c, i] o[c, i]):
//   dP[i, j] = sum_c do[c, i] v[c, j],   dS = P * (dP - D[i])
//   attn_backward_q  (workgroup per query i):  dq[c, i] = scale * sum_j dS[i, j] k[c, j], writes D
//   attn_backward_kv (workgroup per key j):    dv[c, j] = sum_i P[i, j] do[c, i],
//                                               dk[c, j] = scale * sum_i dS[i, j] q[c, i]
//
// Tile maxima and sums are fixed-shape trees in workgroup memory; every accumulator is owned by
// one invocation and summed in key order. Deterministic, no atomics. C <= MAX_C.

struct Params {
    b: u32, c: u32, n: u32, _pad: u32,
    scale: f32, _pad1: u32, _pad2: u32, _pad3: u32,
}

const AT: u32 = 64u;
const MAX_C: u32 = 512u;
const NEG_BIG: f32 = -3.0e38;

@group(0) @binding(0) var<uniform> p: Params;

var<workgroup> row_a: array<f32, MAX_C>;
var<workgroup> row_b: array<f32, MAX_C>;
var<workgroup> acc_a: array<f32, MAX_C>;
var<workgroup> acc_b: array<f32, MAX_C>;
var<workgroup> tile_a: array<f32, AT>;
var<workgroup> tile_b: array<f32, AT>;
var<workgroup> red: array<f32, AT>;

fn tile_max(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = AT / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn tile_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = AT / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// ---- forward -------------------------------------------------------------------------------

@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;

@compute @workgroup_size(64)
fn attn_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wid.x;
    let base = wid.y * p.c * p.n;
    for (var c = lid; c < p.c; c += AT) {
        row_a[c] = q[base + c * p.n + i];
        acc_a[c] = 0.0;
    }
    workgroupBarrier();
    var m_run = NEG_BIG;
    var l_run = 0.0;
    for (var j0 = 0u; j0 < p.n; j0 += AT) {
        let j = j0 + lid;
        var s = NEG_BIG;
        if (j < p.n) {
            var dot = 0.0;
            for (var c = 0u; c < p.c; c++) {
                dot += row_a[c] * k[base + c * p.n + j];
            }
            s = dot * p.scale;
        }
        let m_new = max(m_run, tile_max(lid, s));
        var pj = 0.0;
        if (j < p.n) {
            pj = exp(s - m_new);
        }
        tile_a[lid] = pj;
        let alpha = exp(m_run - m_new);
        l_run = l_run * alpha + tile_sum(lid, pj);
        let len = min(AT, p.n - j0);
        for (var c = lid; c < p.c; c += AT) {
            var a = acc_a[c] * alpha;
            for (var jj = 0u; jj < len; jj++) {
                a += tile_a[jj] * v[base + c * p.n + j0 + jj];
            }
            acc_a[c] = a;
        }
        m_run = m_new;
        workgroupBarrier();
    }
    for (var c = lid; c < p.c; c += AT) {
        o[base + c * p.n + i] = acc_a[c] / l_run;
    }
    if (lid == 0u) {
        lse[wid.y * p.n + i] = m_run + log(l_run);
    }
}

// ---- backward ------------------------------------------------------------------------------

@group(0) @binding(1) var<storage, read> q_b: array<f32>;
@group(0) @binding(2) var<storage, read> k_b: array<f32>;
@group(0) @binding(3) var<storage, read> v_b: array<f32>;
@group(0) @binding(4) var<storage, read> do_b: array<f32>;
@group(0) @binding(5) var<storage, read> lse_b: array<f32>;
// attn_backward_q: o -> dq, D
@group(0) @binding(6) var<storage, read> o_b: array<f32>;
@group(0) @binding(7) var<storage, read_write> dq: array<f32>;
@group(0) @binding(8) var<storage, read_write> dsum: array<f32>;
// attn_backward_kv: D -> dk, dv
@group(0) @binding(6) var<storage, read> dsum_in: array<f32>;
@group(0) @binding(7) var<storage, read_write> dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> dv: array<f32>;

@compute @workgroup_size(64)
fn attn_backward_q(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wid.x;
    let base = wid.y * p.c * p.n;
    var d_part = 0.0;
    for (var c = lid; c < p.c; c += AT) {
        let idx = base + c * p.n + i;
        row_a[c] = q_b[idx];
        row_b[c] = do_b[idx];
        acc_a[c] = 0.0;
        d_part += do_b[idx] * o_b[idx];
    }
    let d_i = tile_sum(lid, d_part);
    let l_i = lse_b[wid.y * p.n + i];
    for (var j0 = 0u; j0 < p.n; j0 += AT) {
        let j = j0 + lid;
        var ds = 0.0;
        if (j < p.n) {
            var dot = 0.0;
            var dp = 0.0;
            for (var c = 0u; c < p.c; c++) {
                dot += row_a[c] * k_b[base + c * p.n + j];
                dp += row_b[c] * v_b[base + c * p.n + j];
            }
            ds = exp(dot * p.scale - l_i) * (dp - d_i);
        }
        tile_a[lid] = ds;
        workgroupBarrier();
        let len = min(AT, p.n - j0);
        for (var c = lid; c < p.c; c += AT) {
            var a = acc_a[c];
            for (var jj = 0u; jj < len; jj++) {
                a += tile_a[jj] * k_b[base + c * p.n + j0 + jj];
            }
            acc_a[c] = a;
        }
        workgroupBarrier();
    }
    for (var c = lid; c < p.c; c += AT) {
        dq[base + c * p.n + i] = acc_a[c] * p.scale;
    }
    if (lid == 0u) {
        dsum[wid.y * p.n + i] = d_i;
    }
}

@compute @workgroup_size(64)
fn attn_backward_kv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = wid.x;
    let base = wid.y * p.c * p.n;
    for (var c = lid; c < p.c; c += AT) {
        row_a[c] = k_b[base + c * p.n + j];
        row_b[c] = v_b[base + c * p.n + j];
        acc_a[c] = 0.0;
        acc_b[c] = 0.0;
    }
    workgroupBarrier();
    for (var i0 = 0u; i0 < p.n; i0 += AT) {
        let i = i0 + lid;
        var pij = 0.0;
        var ds = 0.0;
        if (i < p.n) {
            var dot = 0.0;
            var dp = 0.0;
            for (var c = 0u; c < p.c; c++) {
                dot += q_b[base + c * p.n + i] * row_a[c];
                dp += do_b[base + c * p.n + i] * row_b[c];
            }
            pij = exp(dot * p.scale - lse_b[wid.y * p.n + i]);
            ds = pij * (dp - dsum_in[wid.y * p.n + i]);
        }
        tile_a[lid] = pij;
        tile_b[lid] = ds;
        workgroupBarrier();
        let len = min(AT, p.n - i0);
        for (var c = lid; c < p.c; c += AT) {
            var av = acc_a[c];
            var ak = acc_b[c];
            for (var ii = 0u; ii < len; ii++) {
                let idx = base + c * p.n + i0 + ii;
                av += tile_a[ii] * do_b[idx];
                ak += tile_b[ii] * q_b[idx];
            }
            acc_a[c] = av;
            acc_b[c] = ak;
        }
        workgroupBarrier();
    }
    for (var c = lid; c < p.c; c += AT) {
        dv[base + c * p.n + j] = acc_a[c];
        dk[base + c * p.n + j] = acc_b[c] * p.scale;
    }
}
