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
