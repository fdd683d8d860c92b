// spike_attention.wgsl: Spikformer's softmax-free spiking self-attention core, forward and backward.
//
// q, k, v are spikes (exactly 0/1) laid out [R, C, N]: R = T*B rows (one image at one spiking
// step), C channels split into `heads` heads of d = C / heads consecutive channels, N = H*W
// positions. Per row and head, with Q, K, V the [N, d] slices:
//   O = (Q K^T) V * scale = Q (K^T V) * scale
// Two forms, picked by the caller so the intermediate is the smaller square:
// d-form (N >= d), through the [d, d] matrix M = K^T V:
//   attention_kv   M[r, h, i, j] = sum_n k[r, h*d+i, n] * v[r, h*d+j, n]          (n ascending)
//   attention_out  o[r, h*d+j, n] = (sum_i q[r, h*d+i, n] * M[r, h, i, j]) * scale  (i ascending)
// N-form (N < d), through the [N, N] matrix A = Q K^T:
//   attention_qk   A[r, h, n, m] = sum_i q[r, h*d+i, n] * k[r, h*d+i, m]          (i ascending)
//   attention_av   o[r, h*d+j, n] = (sum_m A[r, h, n, m] * v[r, h*d+j, m]) * scale (m ascending)
// M, A and the second sums are integers below 2^24 (sums of 0/1 products), exact in f32 in any
// order; only the final `* scale` rounds, once, as the reference's ((q k^T) v) * scale: both
// forms give identical bits.
// Backward, from go = dL/do [R, C, N] (float). d-form:
//   attention_grad_m    dM[r, h, i, j] = (sum_n q[r, h*d+i, n] * go[r, h*d+j, n]) * scale
//   attention_grad_qkv  dq[r, h*d+a, n] = (sum_j go[r, h*d+j, n] * M[r, h, a, j]) * scale
//                       dk[r, h*d+a, n] =  sum_j v[r, h*d+j, n] * dM[r, h, a, j]
//                       dv[r, h*d+a, n] =  sum_i k[r, h*d+i, n] * dM[r, h, i, a]
// N-form:
//   attention_grad_a      dA[r, h, n, m] = (sum_j go[r, h*d+j, n] * v[r, h*d+j, m]) * scale
//   attention_grad_qkv_n  dq[r, h*d+a, p] =  sum_m dA[r, h, p, m] * k[r, h*d+a, m]
//                         dk[r, h*d+a, p] =  sum_n dA[r, h, n, p] * q[r, h*d+a, n]
//                         dv[r, h*d+a, p] = (sum_n A[r, h, n, p] * go[r, h*d+a, n]) * scale
// Every kernel computes a 4x4 output tile per invocation (each loaded value feeds 4
// multiply-adds; the grad_qkv kernels three tiles, one per gradient); 1-D grids of 256
// (graph::grid_1d).
// Napkin math: the forward does 2 R C N min(N, d) multiply-adds over 4 (4 R C N + R heads
// min(N, d)^2) bytes, about min(N, d) / 8 flops per byte: compute-bound for real head sizes.
// Spikes are stored bit-packed (graph DType::Spike): element i at bit i % 32 of word i / 32 of
// the flat [R, C, N] tensor; every spike load goes through a load_* function and spike_at.

struct Params {
    rows: u32, c: u32, n: u32, heads: u32,
    d: u32, scale: f32, _pad0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Spike i of a packed tensor, given the word that holds it.
fn spike_at(word: u32, i: u32) -> f32 {
    return f32((word >> (i & 31u)) & 1u);
}

// Register tiles: every kernel computes 4x4 outputs per invocation, so each loaded
// value feeds 4 multiply-adds; rows and columns past the edge read the last valid one (clamped)
// and are never stored, as in matmul.wgsl.
fn tiles(len: u32) -> u32 {
    return (len + 3u) / 4u;
}

fn clamped4(start: u32, len: u32) -> vec4<u32> {
    return min(vec4<u32>(start) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(len - 1u));
}

// The 4x4 output tile of invocation `idx`, for a grid of `ta` x `tb` tiles per (row, head): rh =
// row * heads + head (which [d, d] or [N, N] matrix), the offset of the head's first channel in
// q, k, v, o and go, and the tile's first output coordinates a0 (slow) and b0 (fast). Every kernel
// below is one such tile: it accumulates with outer4 and stores the in-range part.
struct Tile {
    rh: u32, base: u32, a0: u32, b0: u32, inside: bool,
}

fn tile_of(idx: u32, ta: u32, tb: u32) -> Tile {
    let rh = idx / (tb * ta);
    let base = ((rh / p.heads) * p.c + (rh % p.heads) * p.d) * p.n;
    return Tile(rh, base, ((idx / tb) % ta) * 4u, (idx % tb) * 4u, idx < p.rows * p.heads * ta * tb);
}

// acc[a] += x[a] * y: one step of the 4x4 outer-product accumulation.
fn outer4(acc: array<vec4<f32>, 4>, x: vec4<f32>, y: vec4<f32>) -> array<vec4<f32>, 4> {
    return array<vec4<f32>, 4>(acc[0] + x[0] * y, acc[1] + x[1] * y, acc[2] + x[2] * y, acc[3] + x[3] * y);
}

// ---- attention_kv: reads k, v (spikes), writes M -------------------------------------------------

@group(0) @binding(1) var<storage, read> kv_k: array<u32>;
@group(0) @binding(2) var<storage, read> kv_v: array<u32>;
@group(0) @binding(3) var<storage, read_write> kv_m: array<f32>;

fn load_kv_k(i: u32) -> f32 { return spike_at(kv_k[i >> 5u], i); }
fn load_kv_v(i: u32) -> f32 { return spike_at(kv_v[i >> 5u], i); }

@compute @workgroup_size(256)
fn attention_kv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    // One invocation per 4x4 tile (i, j) of M.
    let tb = tiles(p.d);
    let t = tile_of(flat_index(wid, nwg, lid), tb, tb);
    if (!t.inside) {
        return;
    }
    let base = t.base;
    let i0 = t.a0;
    let j0 = t.b0;
    let krow = vec4<u32>(base) + clamped4(i0, p.d) * p.n;
    let vrow = vec4<u32>(base) + clamped4(j0, p.d) * p.n;
    var acc = array<vec4<f32>, 4>();
    for (var n = 0u; n < p.n; n++) {
        let kq = vec4<f32>(load_kv_k(krow[0] + n), load_kv_k(krow[1] + n), load_kv_k(krow[2] + n),
                           load_kv_k(krow[3] + n));
        let vq = vec4<f32>(load_kv_v(vrow[0] + n), load_kv_v(vrow[1] + n), load_kv_v(vrow[2] + n),
                           load_kv_v(vrow[3] + n));
        acc = outer4(acc, kq, vq);
    }
    let m0 = t.rh * p.d * p.d;
    for (var a = 0u; a < 4u && i0 + a < p.d; a++) {
        for (var b = 0u; b < 4u && j0 + b < p.d; b++) {
            kv_m[m0 + (i0 + a) * p.d + j0 + b] = acc[a][b];
        }
    }
}

// ---- attention_out: reads q (spikes), M; writes o ------------------------------------------------

@group(0) @binding(1) var<storage, read> out_q: array<u32>;
@group(0) @binding(2) var<storage, read> out_m: array<f32>;
@group(0) @binding(3) var<storage, read_write> out_o: array<f32>;

fn load_out_q(i: u32) -> f32 { return spike_at(out_q[i >> 5u], i); }

@compute @workgroup_size(256)
fn attention_out(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    // One invocation per tile of 4 channels j x 4 positions n of one head.
    let tn = tiles(p.n);
    let tj = tiles(p.d);
    let t = tile_of(flat_index(wid, nwg, lid), tj, tn);
    if (!t.inside) {
        return;
    }
    let base = t.base;
    let j0 = t.a0;
    let n0 = t.b0;
    let ncol = clamped4(n0, p.n);
    let jcol = clamped4(j0, p.d);
    let m0 = t.rh * p.d * p.d;
    var acc = array<vec4<f32>, 4>();
    for (var i = 0u; i < p.d; i++) {
        let qrow = base + i * p.n;
        let qq = vec4<f32>(load_out_q(qrow + ncol[0]), load_out_q(qrow + ncol[1]), load_out_q(qrow + ncol[2]),
                           load_out_q(qrow + ncol[3]));
        let mrow = m0 + i * p.d;
        let mq = vec4<f32>(out_m[mrow + jcol[0]], out_m[mrow + jcol[1]], out_m[mrow + jcol[2]], out_m[mrow + jcol[3]]);
        acc = outer4(acc, mq, qq);
    }
    for (var a = 0u; a < 4u && j0 + a < p.d; a++) {
        for (var b = 0u; b < 4u && n0 + b < p.n; b++) {
            out_o[base + (j0 + a) * p.n + n0 + b] = acc[a][b] * p.scale;
        }
    }
}

// ---- attention_grad_m: reads q (spikes), go; writes dM --------------------------------------------

@group(0) @binding(1) var<storage, read> gm_q: array<u32>;
@group(0) @binding(2) var<storage, read> gm_go: array<f32>;
@group(0) @binding(3) var<storage, read_write> gm_dm: array<f32>;

fn load_gm_q(i: u32) -> f32 { return spike_at(gm_q[i >> 5u], i); }

@compute @workgroup_size(256)
fn attention_grad_m(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    // One invocation per 4x4 tile (i, j) of dM.
    let tb = tiles(p.d);
    let t = tile_of(flat_index(wid, nwg, lid), tb, tb);
    if (!t.inside) {
        return;
    }
    let base = t.base;
    let i0 = t.a0;
    let j0 = t.b0;
    let qrow = vec4<u32>(base) + clamped4(i0, p.d) * p.n;
    let grow = vec4<u32>(base) + clamped4(j0, p.d) * p.n;
    var acc = array<vec4<f32>, 4>();
    for (var n = 0u; n < p.n; n++) {
        let qq = vec4<f32>(load_gm_q(qrow[0] + n), load_gm_q(qrow[1] + n), load_gm_q(qrow[2] + n),
                           load_gm_q(qrow[3] + n));
        let gq = vec4<f32>(gm_go[grow[0] + n], gm_go[grow[1] + n], gm_go[grow[2] + n], gm_go[grow[3] + n]);
        acc = outer4(acc, qq, gq);
    }
    let m0 = t.rh * p.d * p.d;
    for (var a = 0u; a < 4u && i0 + a < p.d; a++) {
        for (var b = 0u; b < 4u && j0 + b < p.d; b++) {
            gm_dm[m0 + (i0 + a) * p.d + j0 + b] = acc[a][b] * p.scale;
        }
    }
}

// ---- attention_grad_qkv: reads go, M, dM, k, v (spikes); writes dq, dk, dv ---------------------

@group(0) @binding(1) var<storage, read> g_go: array<f32>;
@group(0) @binding(2) var<storage, read> g_m: array<f32>;
@group(0) @binding(3) var<storage, read> g_dm: array<f32>;
@group(0) @binding(4) var<storage, read> g_k: array<u32>;
@group(0) @binding(5) var<storage, read> g_v: array<u32>;
@group(0) @binding(6) var<storage, read_write> g_dq: array<f32>;
@group(0) @binding(7) var<storage, read_write> g_dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> g_dv: array<f32>;

fn load_g_k(i: u32) -> f32 { return spike_at(g_k[i >> 5u], i); }
fn load_g_v(i: u32) -> f32 { return spike_at(g_v[i >> 5u], i); }

@compute @workgroup_size(256)
fn attention_grad_qkv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    // One invocation per tile of 4 channels a x 4 positions n of one head, for dq, dk and dv.
    let tn = tiles(p.n);
    let ta = tiles(p.d);
    let t = tile_of(flat_index(wid, nwg, lid), ta, tn);
    if (!t.inside) {
        return;
    }
    let base = t.base;
    let a0 = t.a0;
    let n0 = t.b0;
    let ncol = clamped4(n0, p.n);
    let acol = clamped4(a0, p.d);
    let m0 = t.rh * p.d * p.d;
    var dq = array<vec4<f32>, 4>();
    var dk = array<vec4<f32>, 4>();
    var dv = array<vec4<f32>, 4>();
    for (var j = 0u; j < p.d; j++) {
        let row = base + j * p.n;
        let gq = vec4<f32>(g_go[row + ncol[0]], g_go[row + ncol[1]], g_go[row + ncol[2]], g_go[row + ncol[3]]);
        let vq = vec4<f32>(load_g_v(row + ncol[0]), load_g_v(row + ncol[1]), load_g_v(row + ncol[2]),
                           load_g_v(row + ncol[3]));
        let kq = vec4<f32>(load_g_k(row + ncol[0]), load_g_k(row + ncol[1]), load_g_k(row + ncol[2]),
                           load_g_k(row + ncol[3]));
        // M[a, j] and dM[a, j] down column j; dM[j, a] along row j.
        let mc = vec4<f32>(g_m[m0 + acol[0] * p.d + j], g_m[m0 + acol[1] * p.d + j], g_m[m0 + acol[2] * p.d + j],
                           g_m[m0 + acol[3] * p.d + j]);
        let dmc = vec4<f32>(g_dm[m0 + acol[0] * p.d + j], g_dm[m0 + acol[1] * p.d + j],
                            g_dm[m0 + acol[2] * p.d + j], g_dm[m0 + acol[3] * p.d + j]);
        let dmr = vec4<f32>(g_dm[m0 + j * p.d + acol[0]], g_dm[m0 + j * p.d + acol[1]],
                            g_dm[m0 + j * p.d + acol[2]], g_dm[m0 + j * p.d + acol[3]]);
        dq = outer4(dq, mc, gq);
        dk = outer4(dk, dmc, vq);
        dv = outer4(dv, dmr, kq);
    }
    for (var a = 0u; a < 4u && a0 + a < p.d; a++) {
        for (var b = 0u; b < 4u && n0 + b < p.n; b++) {
            let at = base + (a0 + a) * p.n + n0 + b;
            g_dq[at] = dq[a][b] * p.scale;
            g_dk[at] = dk[a][b];
            g_dv[at] = dv[a][b];
        }
    }
}

// ---- attention_qk (N-form): reads q, k (spikes), writes A ---------------------------------------

@group(0) @binding(1) var<storage, read> qk_q: array<u32>;
@group(0) @binding(2) var<storage, read> qk_k: array<u32>;
@group(0) @binding(3) var<storage, read_write> qk_a: array<f32>;

fn load_qk_q(i: u32) -> f32 { return spike_at(qk_q[i >> 5u], i); }
fn load_qk_k(i: u32) -> f32 { return spike_at(qk_k[i >> 5u], i); }

@compute @workgroup_size(256)
fn attention_qk(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    // One invocation per 4x4 tile (n, m) of A.
    let tb = tiles(p.n);
    let t = tile_of(flat_index(wid, nwg, lid), tb, tb);
    if (!t.inside) {
        return;
    }
    let base = t.base;
    let n0 = t.a0;
    let m0 = t.b0;
    let ncol = clamped4(n0, p.n);
    let mcol = clamped4(m0, p.n);
    var acc = array<vec4<f32>, 4>();
    for (var i = 0u; i < p.d; i++) {
        let row = base + i * p.n;
        let qq = vec4<f32>(load_qk_q(row + ncol[0]), load_qk_q(row + ncol[1]), load_qk_q(row + ncol[2]),
                           load_qk_q(row + ncol[3]));
        let kq = vec4<f32>(load_qk_k(row + mcol[0]), load_qk_k(row + mcol[1]), load_qk_k(row + mcol[2]),
                           load_qk_k(row + mcol[3]));
        acc = outer4(acc, qq, kq);
    }
    let a0 = t.rh * p.n * p.n;
    for (var a = 0u; a < 4u && n0 + a < p.n; a++) {
        for (var b = 0u; b < 4u && m0 + b < p.n; b++) {
            qk_a[a0 + (n0 + a) * p.n + m0 + b] = acc[a][b];
        }
    }
}

// ---- attention_av (N-form): reads A, v (spikes); writes o ---------------------------------------

@group(0) @binding(1) var<storage, read> av_a: array<f32>;
@group(0) @binding(2) var<storage, read> av_v: array<u32>;
@group(0) @binding(3) var<storage, read_write> av_o: array<f32>;

fn load_av_v(i: u32) -> f32 { return spike_at(av_v[i >> 5u], i); }

@compute @workgroup_size(256)
fn attention_av(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    // One invocation per tile of 4 channels j x 4 positions n of one head.
    let tn = tiles(p.n);
    let tj = tiles(p.d);
    let t = tile_of(flat_index(wid, nwg, lid), tj, tn);
    if (!t.inside) {
        return;
    }
    let base = t.base;
    let j0 = t.a0;
    let n0 = t.b0;
    let arow = vec4<u32>(t.rh * p.n * p.n) + clamped4(n0, p.n) * p.n;
    let vrow = vec4<u32>(base) + clamped4(j0, p.d) * p.n;
    var acc = array<vec4<f32>, 4>();
    for (var m = 0u; m < p.n; m++) {
        let aq = vec4<f32>(av_a[arow[0] + m], av_a[arow[1] + m], av_a[arow[2] + m], av_a[arow[3] + m]);
        let vq = vec4<f32>(load_av_v(vrow[0] + m), load_av_v(vrow[1] + m), load_av_v(vrow[2] + m),
                           load_av_v(vrow[3] + m));
        acc = outer4(acc, vq, aq);
    }
    for (var a = 0u; a < 4u && j0 + a < p.d; a++) {
        for (var b = 0u; b < 4u && n0 + b < p.n; b++) {
            av_o[base + (j0 + a) * p.n + n0 + b] = acc[a][b] * p.scale;
        }
    }
}

// ---- attention_grad_a (N-form): reads go, v (spikes); writes dA ---------------------------------

@group(0) @binding(1) var<storage, read> ga_go: array<f32>;
@group(0) @binding(2) var<storage, read> ga_v: array<u32>;
@group(0) @binding(3) var<storage, read_write> ga_da: array<f32>;

fn load_ga_v(i: u32) -> f32 { return spike_at(ga_v[i >> 5u], i); }

@compute @workgroup_size(256)
fn attention_grad_a(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    // One invocation per 4x4 tile (n, m) of dA.
    let tb = tiles(p.n);
    let t = tile_of(flat_index(wid, nwg, lid), tb, tb);
    if (!t.inside) {
        return;
    }
    let base = t.base;
    let n0 = t.a0;
    let m0 = t.b0;
    let ncol = clamped4(n0, p.n);
    let mcol = clamped4(m0, p.n);
    var acc = array<vec4<f32>, 4>();
    for (var j = 0u; j < p.d; j++) {
        let row = base + j * p.n;
        let gq = vec4<f32>(ga_go[row + ncol[0]], ga_go[row + ncol[1]], ga_go[row + ncol[2]], ga_go[row + ncol[3]]);
        let vq = vec4<f32>(load_ga_v(row + mcol[0]), load_ga_v(row + mcol[1]), load_ga_v(row + mcol[2]),
                           load_ga_v(row + mcol[3]));
        acc = outer4(acc, gq, vq);
    }
    let a0 = t.rh * p.n * p.n;
    for (var a = 0u; a < 4u && n0 + a < p.n; a++) {
        for (var b = 0u; b < 4u && m0 + b < p.n; b++) {
            ga_da[a0 + (n0 + a) * p.n + m0 + b] = acc[a][b] * p.scale;
        }
    }
}

// ---- attention_grad_qkv_n (N-form): reads go, A, dA, q, k (spikes); writes dq, dk, dv ---------

@group(0) @binding(1) var<storage, read> gn_go: array<f32>;
@group(0) @binding(2) var<storage, read> gn_a: array<f32>;
@group(0) @binding(3) var<storage, read> gn_da: array<f32>;
@group(0) @binding(4) var<storage, read> gn_q: array<u32>;
@group(0) @binding(5) var<storage, read> gn_k: array<u32>;
@group(0) @binding(6) var<storage, read_write> gn_dq: array<f32>;
@group(0) @binding(7) var<storage, read_write> gn_dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> gn_dv: array<f32>;

fn load_gn_q(i: u32) -> f32 { return spike_at(gn_q[i >> 5u], i); }
fn load_gn_k(i: u32) -> f32 { return spike_at(gn_k[i >> 5u], i); }

@compute @workgroup_size(256)
fn attention_grad_qkv_n(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    // One invocation per tile of 4 channels a x 4 positions p of one head, for dq, dk and dv.
    let tn = tiles(p.n);
    let ta = tiles(p.d);
    let t = tile_of(flat_index(wid, nwg, lid), ta, tn);
    if (!t.inside) {
        return;
    }
    let base = t.base;
    let c0 = t.a0;
    let p0 = t.b0;
    let pcol = clamped4(p0, p.n);
    let xrow = vec4<u32>(base) + clamped4(c0, p.d) * p.n;
    let sq0 = t.rh * p.n * p.n;
    var dq = array<vec4<f32>, 4>();
    var dk = array<vec4<f32>, 4>();
    var dv = array<vec4<f32>, 4>();
    for (var m = 0u; m < p.n; m++) {
        // dA[p, m] down column m; dA[m, p] and A[m, p] along row m.
        let dac = vec4<f32>(gn_da[sq0 + pcol[0] * p.n + m], gn_da[sq0 + pcol[1] * p.n + m],
                            gn_da[sq0 + pcol[2] * p.n + m], gn_da[sq0 + pcol[3] * p.n + m]);
        let dar = vec4<f32>(gn_da[sq0 + m * p.n + pcol[0]], gn_da[sq0 + m * p.n + pcol[1]],
                            gn_da[sq0 + m * p.n + pcol[2]], gn_da[sq0 + m * p.n + pcol[3]]);
        let ar = vec4<f32>(gn_a[sq0 + m * p.n + pcol[0]], gn_a[sq0 + m * p.n + pcol[1]],
                           gn_a[sq0 + m * p.n + pcol[2]], gn_a[sq0 + m * p.n + pcol[3]]);
        let kq = vec4<f32>(load_gn_k(xrow[0] + m), load_gn_k(xrow[1] + m), load_gn_k(xrow[2] + m),
                           load_gn_k(xrow[3] + m));
        let qq = vec4<f32>(load_gn_q(xrow[0] + m), load_gn_q(xrow[1] + m), load_gn_q(xrow[2] + m),
                           load_gn_q(xrow[3] + m));
        let gq = vec4<f32>(gn_go[xrow[0] + m], gn_go[xrow[1] + m], gn_go[xrow[2] + m], gn_go[xrow[3] + m]);
        dq = outer4(dq, kq, dac);
        dk = outer4(dk, qq, dar);
        dv = outer4(dv, gq, ar);
    }
    for (var a = 0u; a < 4u && c0 + a < p.d; a++) {
        for (var b = 0u; b < 4u && p0 + b < p.n; b++) {
            let at = base + (c0 + a) * p.n + p0 + b;
            gn_dq[at] = dq[a][b];
            gn_dk[at] = dk[a][b];
            gn_dv[at] = dv[a][b] * p.scale;
        }
    }
}
