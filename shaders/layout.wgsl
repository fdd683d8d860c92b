// layout.wgsl: data movement between U-Net stages, one invocation per output element.
//
//   upsample2x:       y[n, c, oy, ox] = x[n, c, oy / 2, ox / 2]      (nearest, scale 2)
//   upsample2x_spikes: the same on bit-packed spikes (element e at bit e % 32 of word e / 32),
//                     one invocation per output word gathering its 32 source bits (no atomics)
//   concat_channels:  y[n, c, s] = a[n, c, s] if c < Ca else b[n, c - Ca, s]   (torch.cat dim=1)
//   repeat_leading:   y[r * m + i] = x[i] for r < reps                 (x [B, ...] -> [T*B, ...],
//                     the reference's x.unsqueeze(0).repeat(T, 1, 1, 1, 1); m = p.s)
// Backward:
//   upsample2x_backward: dx[n, c, y, x] = sum of the 4 dy it was copied to       (p.h, p.w: input)
//   slice_channels:      y[n, c, s] = x[n, c0 + c, s], c < Cy   (concat's backward; Ca = c0,
//                        Cb = Cy, c = Cx the source's channel count)
//   sum_leading:         y[i] = sum_r x[r * m + i]                 (repeat's backward; m = p.s)
// Pure copies: bytes moved = 2 * output size.

struct Params {
    numel: u32, c: u32, h: u32, w: u32,
    ca: u32, cb: u32, s: u32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> y_unary: array<f32>;
@group(0) @binding(1) var<storage, read> a_bits: array<u32>;
@group(0) @binding(2) var<storage, read_write> y_bits: array<u32>;

// p.h, p.w are the input height/width; output is 2h x 2w.
@compute @workgroup_size(256)
fn upsample2x(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    let wo = 2u * p.w;
    let ho = 2u * p.h;
    let ox = i % wo;
    let oy = (i / wo) % ho;
    let plane = i / (wo * ho);
    y_unary[i] = a[(plane * p.h + oy / 2u) * p.w + ox / 2u];
}

// p.numel counts output elements; invocation i writes word i.
@compute @workgroup_size(256)
fn upsample2x_spikes(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let word = flat_index(wid, nwg, lid);
    if (word * 32u >= p.numel) {
        return;
    }
    let wo = 2u * p.w;
    let ho = 2u * p.h;
    var bits = 0u;
    for (var k = 0u; k < 32u; k++) {
        let i = word * 32u + k;
        if (i >= p.numel) {
            break;
        }
        let ox = i % wo;
        let oy = (i / wo) % ho;
        let plane = i / (wo * ho);
        let src = (plane * p.h + oy / 2u) * p.w + ox / 2u;
        bits |= ((a_bits[src / 32u] >> (src % 32u)) & 1u) << k;
    }
    y_bits[word] = bits;
}

@compute @workgroup_size(256)
fn concat_channels(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    let ct = p.ca + p.cb;
    let sp = i % p.s;
    let ch = (i / p.s) % ct;
    let n = i / (p.s * ct);
    if (ch < p.ca) {
        y[i] = a[(n * p.ca + ch) * p.s + sp];
    } else {
        y[i] = b[(n * p.cb + ch - p.ca) * p.s + sp];
    }
}

@compute @workgroup_size(256)
fn repeat_leading(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    y_unary[i] = a[i % p.s];
}

@compute @workgroup_size(256)
fn upsample2x_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    let ix = i % p.w;
    let iy = (i / p.w) % p.h;
    let plane = i / (p.w * p.h);
    let wo = 2u * p.w;
    let base = (plane * 2u * p.h + 2u * iy) * wo + 2u * ix;
    y_unary[i] = (a[base] + a[base + 1u]) + (a[base + wo] + a[base + wo + 1u]);
}

@compute @workgroup_size(256)
fn slice_channels(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    let sp = i % p.s;
    let ch = (i / p.s) % p.cb;
    let n = i / (p.s * p.cb);
    y_unary[i] = a[(n * p.c + p.ca + ch) * p.s + sp];
}

@compute @workgroup_size(256)
fn sum_leading(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.s) {
        return;
    }
    let reps = p.numel / p.s;
    var acc = 0.0;
    for (var r = 0u; r < reps; r++) {
        acc += a[r * p.s + i];
    }
    y_unary[i] = acc;
}
