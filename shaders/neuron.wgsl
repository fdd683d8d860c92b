// neuron.wgsl: multi-step spiking neuron, fused over the T spiking time steps.
//
// Input x is time-major [T, N] (N = everything else: B*C*H*W), as the reference's [T*B, ...].
// One invocation per neuron keeps the membrane v in a register for all T steps; each spike is
// written once. For t = 0..T-1, starting from v = v_reset:
//   charge   IF:  h = v + x[t]
//            LIF: h = v + (x[t] - (v - v_reset)) / tau        (spikingjelly decay_input, tau > 1)
//   fire     s = 1 if h - v_th >= 0 else 0                  (Heaviside, as the reference)
//   reset    v = h * (1 - s) + v_reset * s                  (hard reset, not detached)
// The training form also stores h[t], from which backward recomputes the ATan surrogate.
// Backward (neuron_backward) runs the same loop in reverse time with the surrogate
// dS/dH = 1 / (1 + (pi (h - v_th))^2) (ATan, alpha 2), the reset not detached:
//   dv[t]/dh[t] = (1 - s) + (v_reset - h) dS/dH,  dh[t]/dv[t-1] = 1 (IF) or 1 - 1/tau (LIF),
//   dh[t]/dx[t] = 1 (IF) or 1/tau (LIF); gh = gs[t] dS/dH + gv dv/dh, gx[t] = gh dh/dx,
//   gv <- gh dh/dv, from gv = 0 at t = T-1 (spikingjelly's multi-step BPTT).
// Napkin math: 4 bytes read + 4 written per neuron-step (+4 for h when training): purely
// bandwidth-bound, so the fused loop is as fast as one copy of x.

struct Params {
    n: u32, t: u32, lif: u32, _pad: u32,
    v_th: f32, v_reset: f32, inv_tau: f32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> spikes: array<f32>;
@group(0) @binding(3) var<storage, read_write> h_saved: array<f32>;

fn charge(v: f32, xt: f32) -> f32 {
    if (p.lif != 0u) {
        return v + (xt - (v - p.v_reset)) * p.inv_tau;
    }
    return v + xt;
}

fn neuron_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid;
}

@compute @workgroup_size(256)
fn neuron_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = neuron_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    var v = p.v_reset;
    for (var t = 0u; t < p.t; t++) {
        let h = charge(v, x[t * p.n + i]);
        let s = select(0.0, 1.0, h - p.v_th >= 0.0);
        spikes[t * p.n + i] = s;
        v = h * (1.0 - s) + p.v_reset * s;
    }
}

@compute @workgroup_size(256)
fn neuron_forward_train(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let i = neuron_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    var v = p.v_reset;
    for (var t = 0u; t < p.t; t++) {
        let h = charge(v, x[t * p.n + i]);
        let s = select(0.0, 1.0, h - p.v_th >= 0.0);
        spikes[t * p.n + i] = s;
        h_saved[t * p.n + i] = h;
        v = h * (1.0 - s) + p.v_reset * s;
    }
}

@group(0) @binding(1) var<storage, read> grad_spikes: array<f32>;
@group(0) @binding(2) var<storage, read> h_in: array<f32>;
@group(0) @binding(3) var<storage, read_write> grad_x: array<f32>;

@compute @workgroup_size(256)
fn neuron_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = neuron_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    var dh_dx = 1.0;
    var dh_dv = 1.0;
    if (p.lif != 0u) {
        dh_dx = p.inv_tau;
        dh_dv = 1.0 - p.inv_tau;
    }
    var gv = 0.0;
    for (var k = 0u; k < p.t; k++) {
        let t = p.t - 1u - k;
        let h = h_in[t * p.n + i];
        let over = h - p.v_th;
        let s = select(0.0, 1.0, over >= 0.0);
        let pi_x = 3.141592653589793 * over;
        let sg = 1.0 / (1.0 + pi_x * pi_x);
        let dv_dh = (1.0 - s) + (p.v_reset - h) * sg;
        let gh = grad_spikes[t * p.n + i] * sg + gv * dv_dh;
        grad_x[t * p.n + i] = gh * dh_dx;
        gv = gh * dh_dv;
    }
}
