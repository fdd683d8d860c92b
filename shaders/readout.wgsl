// readout.wgsl: the membrane output layer (FSVAE's "last membrane potential of a neuron that
// never fires"), collapsing the T spiking steps into the network output:
//
//   y[i] = sum_{t=0}^{T-1} decay^(T-1-t) * h[t, i]          h: [T, M] time-major, y: [M]
//
// With decay 0.8 and T = 4 the weights are 0.512, 0.64, 0.8, 1. The weights are built by
// repeated multiplication from t = T-1 down, and the sum runs t = 0 upwards (the CPU reference
// does the same). Backward (readout_backward): dh[t, i] = decay^(T-1-t) * dy[i].

struct Params {
    m: u32, t: u32, decay: f32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> h: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn membrane_readout(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.m) {
        return;
    }
    var acc = 0.0;
    for (var t = 0u; t < p.t; t++) {
        var w = 1.0;
        for (var k = t + 1u; k < p.t; k++) {
            w = w * p.decay;
        }
        acc += w * h[t * p.m + i];
    }
    y[i] = acc;
}

@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> dh: array<f32>;

@compute @workgroup_size(256)
fn readout_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.m) {
        return;
    }
    let g = dy[i];
    for (var t = 0u; t < p.t; t++) {
        var w = 1.0;
        for (var k = t + 1u; k < p.t; k++) {
            w = w * p.decay;
        }
        dh[t * p.m + i] = w * g;
    }
}
