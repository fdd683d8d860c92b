// neuron.wgsl: multi-step spiking neuron, fused over the T spiking time steps.
//
// Input x is time-major [T, N] f32 (N = everything else: B*C*H*W), as the reference's [T*B, ...].
// Spikes are written bit-packed (graph dtype Spike): element e = t*N + i of the flat [T, N]
// tensor is bit e % 32 of word e / 32. For t = 0..T-1, starting from v = v_reset:
//   charge   IF:  h = v + x[t]
//            LIF: h = v + (x[t] - (v - v_reset)) / tau        (spikingjelly decay_input, tau > 1)
//   fire     s = 1 if h - v_th >= 0 else 0                  (Heaviside, as the reference)
//   reset    v = h * (1 - s) + v_reset * s                  (hard reset, not detached)
// The forward (inference and training) has two entries, chosen by N:
//   neuron_forward_aligned, N % 32 == 0: one invocation per neuron (coalesced reads of x), its
//                membrane in a register, its spikes of up to 32 steps collected as bits of one
//                u32; a barrier, then the workgroup's 32 neurons x 32 steps are transposed out
//                of workgroup memory into one whole word per step (no atomics, no clearing).
//                Workgroups of 32 keep the barrier cheap on lavapipe.
//   neuron_forward, any N: one invocation per output word; each of its 32 elements (t, i) reruns neuron i's
//                recurrence from step 0 (at most T charges each): the same float operations in
//                the same order, so the same spikes, for the odd sizes that never occur in the
//                U-Net (T*N/2 extra reads of x on average).
// Backward (neuron_backward) keeps no membrane: it reads the neuron's input x, reruns the charge
// (the same code, so h is bit-identical to the forward's), parks h[t] in grad_x, then runs the
// loop in reverse time with the surrogate dS/dH = 1 / (1 + (pi (h - v_th))^2) (ATan, alpha 2),
// the reset not detached:
//   dv[t]/dh[t] = (1 - s) + (v_reset - h) dS/dH,  dh[t]/dv[t-1] = 1 (IF) or 1 - 1/tau (LIF),
//   dh[t]/dx[t] = 1 (IF) or 1/tau (LIF); gh = gs[t] dS/dH + gv dv/dh, gx[t] = gh dh/dx,
//   gv <- gh dh/dv, from gv = 0 at t = T-1 (spikingjelly's multi-step BPTT). Each h[t] is read
// before gx[t] overwrites it, by the invocation that wrote it. neuron_backward_acc is the same
// for an input that other consumers already gave a gradient g0: it writes g0 + gx (the sum the
// graph's gradient accumulation would add in a separate pass, same order, same bits).
// The affine entries serve a neuron whose input is a training-mode BatchNorm of a saved tensor c,
// optionally plus a per-(image, channel) term (BN, then the time-embedding add):
//   x[e] = (c[e] * alpha + beta) [+ emb[(img % B) * C + ch]],  alpha = weight[ch] * invstd[st],
//   beta = bias[ch] - mean[st] * alpha,  ch = (e / HW) % C, img = e / (HW * C), st = ch, or with
//   bn_groups BatchNorm groups of B / bn_groups images g * C + ch for the group g of img % B
// written as batchnorm.wgsl's bn_train_apply and elementwise.wgsl's add_channel write it, so x is
// bit for bit the tensor those two kernels would have written; it is computed in registers and
// never stored (has_emb = 0: no term, the emb binding is a placeholder and is not read).
//   neuron_forward_affine_aligned / neuron_forward_affine: the two forward grids above on x.
//   neuron_backward_affine: neuron_backward on x recomputed from c (which BN's backward keeps
//                anyway); its gradient is dL/dx, which the caller turns into BN's and emb's.
// Bindings of the affine entries: 1 c, 2 weight, 3 bias, 4 mean, 5 invstd, 6 emb, then the
// forward writes spikes at 7; the backward reads grad_spikes at 7 and writes grad_x at 8.
// Napkin math: forward reads 4 bytes and writes 1 bit per neuron-step; training keeps x (the
// input, often saved anyway) instead of a second f32 tensor of membranes. The affine forward
// replaces BN-apply (8 bytes per element), the add (12) and the neuron's read of x (4) with one
// read of c (4).

struct Params {
    n: u32, t: u32, lif: u32, bn_groups: u32,
    v_th: f32, v_reset: f32, inv_tau: f32, _pad1: u32,
    c: u32, hw: u32, b: u32, has_emb: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> spikes: array<u32>;

fn charge(v: f32, xt: f32) -> f32 {
    if (p.lif != 0u) {
        return v + (xt - (v - p.v_reset)) * p.inv_tau;
    }
    return v + xt;
}

fn fires(h: f32) -> bool {
    return h - p.v_th >= 0.0;
}

fn reset(h: f32, s: bool) -> f32 {
    let sf = select(0.0, 1.0, s);
    return h * (1.0 - sf) + p.v_reset * sf;
}

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid;
}

// Spike masks of the workgroup's 32 neurons: bit k of masks[l] is neuron l's spike at step t0 + k.
var<workgroup> masks: array<u32, 32>;

// Bit l of the result: neuron l's spike at step t0 + k (the transpose of masks).
fn step_word(k: u32) -> u32 {
    var bits = 0u;
    for (var l = 0u; l < 32u; l++) {
        bits |= ((masks[l] >> k) & 1u) << l;
    }
    return bits;
}

// N % 32 == 0: workgroups of 32 neurons, one output word per step each.
@compute @workgroup_size(32)
fn neuron_forward_aligned(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let base = (wid.y * nwg.x + wid.x) * 32u;
    let live = base < p.n;
    let i = base + lid;
    var v = p.v_reset;
    for (var t0 = 0u; t0 < p.t; t0 += 32u) {
        let steps = min(32u, p.t - t0);
        var m = 0u;
        if (live) {
            for (var k = 0u; k < steps; k++) {
                let h = charge(v, x[(t0 + k) * p.n + i]);
                let s = fires(h);
                m |= select(0u, 1u << k, s);
                v = reset(h, s);
            }
        }
        masks[lid] = m;
        workgroupBarrier();
        // Invocation k writes the word of step t0 + k.
        if (live && lid < steps) {
            spikes[((t0 + lid) * p.n + base) / 32u] = step_word(lid);
        }
        workgroupBarrier();
    }
}

fn forward_words(inv: u32) {
    let total = p.t * p.n;
    if (inv * 32u >= total) {
        return;
    }
    var word = 0u;
    for (var k = 0u; k < 32u; k++) {
        let e = inv * 32u + k;
        if (e >= total) {
            break;
        }
        let step = e / p.n;
        let i = e % p.n;
        var v = p.v_reset;
        var s = false;
        for (var t = 0u; t <= step; t++) {
            let h = charge(v, x[t * p.n + i]);
            s = fires(h);
            v = reset(h, s);
        }
        word |= select(0u, 1u << k, s);
    }
    spikes[inv] = word;
}

// Any N: one invocation per output word.
@compute @workgroup_size(256)
fn neuron_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    forward_words(flat_index(wid, nwg, lid));
}

@group(0) @binding(1) var<storage, read> grad_spikes: array<f32>;
@group(0) @binding(2) var<storage, read> x_in: array<f32>;
@group(0) @binding(3) var<storage, read_write> grad_x: array<f32>;

// One step of the reverse-time sweep, shared by both backward entries: from h[t], gs[t] and the
// gradient gv flowing back from step t+1, returns (gx[t], gv for step t-1).
fn backward_step(h: f32, gs: f32, gv: f32) -> vec2<f32> {
    var dh_dx = 1.0;
    var dh_dv = 1.0;
    if (p.lif != 0u) {
        dh_dx = p.inv_tau;
        dh_dv = 1.0 - p.inv_tau;
    }
    let over = h - p.v_th;
    let s = select(0.0, 1.0, over >= 0.0);
    let pi_x = 3.141592653589793 * over;
    let sg = 1.0 / (1.0 + pi_x * pi_x);
    let dv_dh = (1.0 - s) + (p.v_reset - h) * sg;
    let gh = gs * sg + gv * dv_dh;
    return vec2<f32>(gh * dh_dx, gh * dh_dv);
}

@compute @workgroup_size(256)
fn neuron_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    var v = p.v_reset;
    for (var t = 0u; t < p.t; t++) {
        let h = charge(v, x_in[t * p.n + i]);
        grad_x[t * p.n + i] = h;
        v = reset(h, fires(h));
    }
    var gv = 0.0;
    for (var k = 0u; k < p.t; k++) {
        let e = (p.t - 1u - k) * p.n + i;
        let r = backward_step(grad_x[e], grad_spikes[e], gv);
        grad_x[e] = r.x;
        gv = r.y;
    }
}

@group(0) @binding(3) var<storage, read> grad_earlier: array<f32>;
@group(0) @binding(4) var<storage, read_write> grad_x_total: array<f32>;

@compute @workgroup_size(256)
fn neuron_backward_acc(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    var v = p.v_reset;
    for (var t = 0u; t < p.t; t++) {
        let h = charge(v, x_in[t * p.n + i]);
        grad_x_total[t * p.n + i] = h;
        v = reset(h, fires(h));
    }
    var gv = 0.0;
    for (var k = 0u; k < p.t; k++) {
        let e = (p.t - 1u - k) * p.n + i;
        let r = backward_step(grad_x_total[e], grad_spikes[e], gv);
        grad_x_total[e] = grad_earlier[e] + r.x;
        gv = r.y;
    }
}

// ---- BN-apply (+ emb) fused in ------------------------------------------------------------------

@group(0) @binding(2) var<storage, read> bn_weight: array<f32>;
@group(0) @binding(3) var<storage, read> bn_bias: array<f32>;
@group(0) @binding(4) var<storage, read> bn_mean: array<f32>;
@group(0) @binding(5) var<storage, read> bn_invstd: array<f32>;
@group(0) @binding(6) var<storage, read> emb: array<f32>;
@group(0) @binding(7) var<storage, read_write> spikes_affine: array<u32>;
@group(0) @binding(7) var<storage, read> grad_spikes_affine: array<f32>;
@group(0) @binding(8) var<storage, read_write> grad_x_affine: array<f32>;

// (alpha, beta, term) of flat element e: the BN affine of its channel and the added term of its
// (image, channel), 0 without one (then unused).
fn affine_coeffs(e: u32) -> vec3<f32> {
    let ch = (e / p.hw) % p.c;
    let img = (e / (p.hw * p.c)) % p.b;
    // BN statistics of the image's group (batchnorm.wgsl's stat_index); bn_groups <= 1: one.
    var st = ch;
    if (p.bn_groups > 1u) {
        st = img / (p.b / p.bn_groups) * p.c + ch;
    }
    let alpha = bn_weight[ch] * bn_invstd[st];
    let beta = bn_bias[ch] - bn_mean[st] * alpha;
    var term = 0.0;
    if (p.has_emb != 0u) {
        term = emb[img * p.c + ch];
    }
    return vec3<f32>(alpha, beta, term);
}

// x of element e with the coefficients of affine_coeffs: bn_train_apply's expression, then
// add_channel's add.
fn affine_x(e: u32, k: vec3<f32>) -> f32 {
    let y = x[e] * k.x + k.y;
    if (p.has_emb != 0u) {
        return y + k.z;
    }
    return y;
}

// neuron_forward_aligned on x = affine_x. Element t*N + i has the channel and image of i (N is a
// multiple of C*HW), so the coefficients are read once per neuron.
@compute @workgroup_size(32)
fn neuron_forward_affine_aligned(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                 @builtin(local_invocation_index) lid: u32) {
    let base = (wid.y * nwg.x + wid.x) * 32u;
    let live = base < p.n;
    let i = base + lid;
    var k = vec3<f32>(0.0);
    if (live) {
        k = affine_coeffs(i);
    }
    var v = p.v_reset;
    for (var t0 = 0u; t0 < p.t; t0 += 32u) {
        let steps = min(32u, p.t - t0);
        var m = 0u;
        if (live) {
            for (var j = 0u; j < steps; j++) {
                let h = charge(v, affine_x((t0 + j) * p.n + i, k));
                let s = fires(h);
                m |= select(0u, 1u << j, s);
                v = reset(h, s);
            }
        }
        masks[lid] = m;
        workgroupBarrier();
        if (live && lid < steps) {
            spikes_affine[((t0 + lid) * p.n + base) / 32u] = step_word(lid);
        }
        workgroupBarrier();
    }
}

// neuron_forward on x = affine_x: one invocation per output word, any N.
@compute @workgroup_size(256)
fn neuron_forward_affine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let inv = flat_index(wid, nwg, lid);
    let total = p.t * p.n;
    if (inv * 32u >= total) {
        return;
    }
    var word = 0u;
    for (var j = 0u; j < 32u; j++) {
        let e = inv * 32u + j;
        if (e >= total) {
            break;
        }
        let step = e / p.n;
        let i = e % p.n;
        let k = affine_coeffs(i);
        var v = p.v_reset;
        var s = false;
        for (var t = 0u; t <= step; t++) {
            let h = charge(v, affine_x(t * p.n + i, k));
            s = fires(h);
            v = reset(h, s);
        }
        word |= select(0u, 1u << j, s);
    }
    spikes_affine[inv] = word;
}

@compute @workgroup_size(256)
fn neuron_backward_affine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let k = affine_coeffs(i);
    var v = p.v_reset;
    for (var t = 0u; t < p.t; t++) {
        let e = t * p.n + i;
        let h = charge(v, affine_x(e, k));
        grad_x_affine[e] = h;
        v = reset(h, fires(h));
    }
    var gv = 0.0;
    for (var j = 0u; j < p.t; j++) {
        let e = (p.t - 1u - j) * p.n + i;
        let r = backward_step(grad_x_affine[e], grad_spikes_affine[e], gv);
        grad_x_affine[e] = r.x;
        gv = r.y;
    }
}
