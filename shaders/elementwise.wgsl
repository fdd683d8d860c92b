// elementwise.wgsl: pointwise ops over flat f32 tensors, one invocation per element.
//
//   swish:          y = x * sigmoid(x) = x * (1 / (1 + exp(-x)))     (nn.SiLU / the reference's Swish)
//   add:            y = a + b                                         (same shapes)
//   add_channel:    y[n, c, s] = x[n, c, s] + e[n % B, c]             x: [N, C, S], e: [B, C]
//                   (the time-embedding projection broadcast over spiking steps T = N / B and H*W = S)
//   swish_backward: dx = dy * (sg + x sg (1 - sg)), sg = sigmoid(x)    (a = x, b = dy)
// Bandwidth-bound: 8-12 bytes per element.

struct Params {
    numel: u32, c: u32, s: u32, b: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> y_unary: array<f32>;

@compute @workgroup_size(256)
fn swish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    let v = a[i];
    y_unary[i] = v * (1.0 / (1.0 + exp(-v)));
}

@compute @workgroup_size(256)
fn add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    y[i] = a[i] + b[i];
}

@compute @workgroup_size(256)
fn add_channel(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    let ch = (i / p.s) % p.c;
    let n = i / (p.s * p.c);
    y[i] = a[i] + b[(n % p.b) * p.c + ch];
}

@compute @workgroup_size(256)
fn swish_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    let v = a[i];
    let sg = 1.0 / (1.0 + exp(-v));
    y[i] = b[i] * (sg + v * sg * (1.0 - sg));
}
