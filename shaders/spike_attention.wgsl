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
// One invocation per output element, 1-D grids of 256 (see graph::grid_1d). Napkin math: the
// forward does 2 R C N min(N, d) multiply-adds over 4 (4 R C N + R heads min(N, d)^2) bytes; for
// the small d of attention heads it is bandwidth-bound, like the 1x1 convs around it.
// Spike loads go through the load_* functions only, so a packed spike storage changes them alone.

struct Params {
    rows: u32, c: u32, n: u32, heads: u32,
    d: u32, scale: f32, _pad0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid;
}

// ---- attention_kv: reads k, v (spikes), writes M -------------------------------------------------

@group(0) @binding(1) var<storage, read> kv_k: array<f32>;
@group(0) @binding(2) var<storage, read> kv_v: array<f32>;
@group(0) @binding(3) var<storage, read_write> kv_m: array<f32>;

fn load_kv_k(i: u32) -> f32 { return kv_k[i]; }
fn load_kv_v(i: u32) -> f32 { return kv_v[i]; }

@compute @workgroup_size(256)
fn attention_kv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let idx = flat_index(wid, nwg, lid);
    if (idx >= p.rows * p.heads * p.d * p.d) {
        return;
    }
    let j = idx % p.d;
    let i = (idx / p.d) % p.d;
    let rh = idx / (p.d * p.d);
    let h = rh % p.heads;
    let r = rh / p.heads;
    let ki = (r * p.c + h * p.d + i) * p.n;
    let vj = (r * p.c + h * p.d + j) * p.n;
    var acc = 0.0;
    for (var n = 0u; n < p.n; n++) {
        acc += load_kv_k(ki + n) * load_kv_v(vj + n);
    }
    kv_m[idx] = acc;
}

// ---- attention_out: reads q (spikes), M; writes o ------------------------------------------------

@group(0) @binding(1) var<storage, read> out_q: array<f32>;
@group(0) @binding(2) var<storage, read> out_m: array<f32>;
@group(0) @binding(3) var<storage, read_write> out_o: array<f32>;

fn load_out_q(i: u32) -> f32 { return out_q[i]; }

@compute @workgroup_size(256)
fn attention_out(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let idx = flat_index(wid, nwg, lid);
    if (idx >= p.rows * p.c * p.n) {
        return;
    }
    let n = idx % p.n;
    let c = (idx / p.n) % p.c;
    let r = idx / (p.n * p.c);
    let h = c / p.d;
    let j = c % p.d;
    let q0 = (r * p.c + h * p.d) * p.n + n;
    let m0 = (r * p.heads + h) * p.d * p.d + j;
    var acc = 0.0;
    for (var i = 0u; i < p.d; i++) {
        acc += load_out_q(q0 + i * p.n) * out_m[m0 + i * p.d];
    }
    out_o[idx] = acc * p.scale;
}

// ---- attention_grad_m: reads q (spikes), go; writes dM --------------------------------------------

@group(0) @binding(1) var<storage, read> gm_q: array<f32>;
@group(0) @binding(2) var<storage, read> gm_go: array<f32>;
@group(0) @binding(3) var<storage, read_write> gm_dm: array<f32>;

fn load_gm_q(i: u32) -> f32 { return gm_q[i]; }

@compute @workgroup_size(256)
fn attention_grad_m(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let idx = flat_index(wid, nwg, lid);
    if (idx >= p.rows * p.heads * p.d * p.d) {
        return;
    }
    let j = idx % p.d;
    let i = (idx / p.d) % p.d;
    let rh = idx / (p.d * p.d);
    let h = rh % p.heads;
    let r = rh / p.heads;
    let qi = (r * p.c + h * p.d + i) * p.n;
    let gj = (r * p.c + h * p.d + j) * p.n;
    var acc = 0.0;
    for (var n = 0u; n < p.n; n++) {
        acc += load_gm_q(qi + n) * gm_go[gj + n];
    }
    gm_dm[idx] = acc * p.scale;
}

// ---- attention_grad_qkv: reads go, M, dM, k, v (spikes); writes dq, dk, dv ---------------------

@group(0) @binding(1) var<storage, read> g_go: array<f32>;
@group(0) @binding(2) var<storage, read> g_m: array<f32>;
@group(0) @binding(3) var<storage, read> g_dm: array<f32>;
@group(0) @binding(4) var<storage, read> g_k: array<f32>;
@group(0) @binding(5) var<storage, read> g_v: array<f32>;
@group(0) @binding(6) var<storage, read_write> g_dq: array<f32>;
@group(0) @binding(7) var<storage, read_write> g_dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> g_dv: array<f32>;

fn load_g_k(i: u32) -> f32 { return g_k[i]; }
fn load_g_v(i: u32) -> f32 { return g_v[i]; }

@compute @workgroup_size(256)
fn attention_grad_qkv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let idx = flat_index(wid, nwg, lid);
    if (idx >= p.rows * p.c * p.n) {
        return;
    }
    let n = idx % p.n;
    let c = (idx / p.n) % p.c;
    let r = idx / (p.n * p.c);
    let h = c / p.d;
    let a = c % p.d;
    let x0 = (r * p.c + h * p.d) * p.n + n;
    let m0 = (r * p.heads + h) * p.d * p.d;
    var dq = 0.0;
    var dk = 0.0;
    var dv = 0.0;
    for (var j = 0u; j < p.d; j++) {
        let at = x0 + j * p.n;
        dq += g_go[at] * g_m[m0 + a * p.d + j];
        dk += load_g_v(at) * g_dm[m0 + a * p.d + j];
        dv += load_g_k(at) * g_dm[m0 + j * p.d + a];
    }
    g_dq[idx] = dq * p.scale;
    g_dk[idx] = dk;
    g_dv[idx] = dv;
}

// ---- attention_qk (N-form): reads q, k (spikes), writes A ---------------------------------------

@group(0) @binding(1) var<storage, read> qk_q: array<f32>;
@group(0) @binding(2) var<storage, read> qk_k: array<f32>;
@group(0) @binding(3) var<storage, read_write> qk_a: array<f32>;

fn load_qk_q(i: u32) -> f32 { return qk_q[i]; }
fn load_qk_k(i: u32) -> f32 { return qk_k[i]; }

@compute @workgroup_size(256)
fn attention_qk(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let idx = flat_index(wid, nwg, lid);
    if (idx >= p.rows * p.heads * p.n * p.n) {
        return;
    }
    let m = idx % p.n;
    let n = (idx / p.n) % p.n;
    let rh = idx / (p.n * p.n);
    let h = rh % p.heads;
    let r = rh / p.heads;
    let x0 = (r * p.c + h * p.d) * p.n;
    var acc = 0.0;
    for (var i = 0u; i < p.d; i++) {
        acc += load_qk_q(x0 + i * p.n + n) * load_qk_k(x0 + i * p.n + m);
    }
    qk_a[idx] = acc;
}

// ---- attention_av (N-form): reads A, v (spikes); writes o ---------------------------------------

@group(0) @binding(1) var<storage, read> av_a: array<f32>;
@group(0) @binding(2) var<storage, read> av_v: array<f32>;
@group(0) @binding(3) var<storage, read_write> av_o: array<f32>;

fn load_av_v(i: u32) -> f32 { return av_v[i]; }

@compute @workgroup_size(256)
fn attention_av(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let idx = flat_index(wid, nwg, lid);
    if (idx >= p.rows * p.c * p.n) {
        return;
    }
    let n = idx % p.n;
    let c = (idx / p.n) % p.c;
    let r = idx / (p.n * p.c);
    let h = c / p.d;
    let a0 = ((r * p.heads + h) * p.n + n) * p.n;
    let v0 = (r * p.c + c) * p.n;
    var acc = 0.0;
    for (var m = 0u; m < p.n; m++) {
        acc += av_a[a0 + m] * load_av_v(v0 + m);
    }
    av_o[idx] = acc * p.scale;
}

// ---- attention_grad_a (N-form): reads go, v (spikes); writes dA ---------------------------------

@group(0) @binding(1) var<storage, read> ga_go: array<f32>;
@group(0) @binding(2) var<storage, read> ga_v: array<f32>;
@group(0) @binding(3) var<storage, read_write> ga_da: array<f32>;

fn load_ga_v(i: u32) -> f32 { return ga_v[i]; }

@compute @workgroup_size(256)
fn attention_grad_a(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let idx = flat_index(wid, nwg, lid);
    if (idx >= p.rows * p.heads * p.n * p.n) {
        return;
    }
    let m = idx % p.n;
    let n = (idx / p.n) % p.n;
    let rh = idx / (p.n * p.n);
    let h = rh % p.heads;
    let r = rh / p.heads;
    let x0 = (r * p.c + h * p.d) * p.n;
    var acc = 0.0;
    for (var j = 0u; j < p.d; j++) {
        acc += ga_go[x0 + j * p.n + n] * load_ga_v(x0 + j * p.n + m);
    }
    ga_da[idx] = acc * p.scale;
}

// ---- attention_grad_qkv_n (N-form): reads go, A, dA, q, k (spikes); writes dq, dk, dv ---------

@group(0) @binding(1) var<storage, read> gn_go: array<f32>;
@group(0) @binding(2) var<storage, read> gn_a: array<f32>;
@group(0) @binding(3) var<storage, read> gn_da: array<f32>;
@group(0) @binding(4) var<storage, read> gn_q: array<f32>;
@group(0) @binding(5) var<storage, read> gn_k: array<f32>;
@group(0) @binding(6) var<storage, read_write> gn_dq: array<f32>;
@group(0) @binding(7) var<storage, read_write> gn_dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> gn_dv: array<f32>;

fn load_gn_q(i: u32) -> f32 { return gn_q[i]; }
fn load_gn_k(i: u32) -> f32 { return gn_k[i]; }

@compute @workgroup_size(256)
fn attention_grad_qkv_n(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let idx = flat_index(wid, nwg, lid);
    if (idx >= p.rows * p.c * p.n) {
        return;
    }
    let pos = idx % p.n;
    let c = (idx / p.n) % p.c;
    let r = idx / (p.n * p.c);
    let h = c / p.d;
    let row0 = (r * p.c + c) * p.n;
    let a0 = (r * p.heads + h) * p.n * p.n;
    var dq = 0.0;
    var dk = 0.0;
    var dv = 0.0;
    for (var m = 0u; m < p.n; m++) {
        dq += gn_da[a0 + pos * p.n + m] * load_gn_k(row0 + m);
        dk += gn_da[a0 + m * p.n + pos] * load_gn_q(row0 + m);
        dv += gn_a[a0 + m * p.n + pos] * gn_go[row0 + m];
    }
    gn_dq[idx] = dq;
    gn_dk[idx] = dk;
    gn_dv[idx] = dv * p.scale;
}
