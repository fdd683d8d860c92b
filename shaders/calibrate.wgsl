// calibrate.wgsl: calibration kernels that measure an adapter's peak rates (not model math).
//
//   fma_rate:  invocation i keeps 8 independent vec4 chains acc_j, starting at
//              acc_j[c] = f32((i + 4j + c) & 255) / 256, and runs `iters` rounds of
//              acc_j = fma(acc_j, a, b) (64 flops per round); then
//              out[i] = sum_j ((acc_j.x + acc_j.y) + (acc_j.z + acc_j.w))       (j ascending)
//              so the work cannot be optimised away. Independent chains hide FMA latency; the
//              only memory traffic is one store per invocation.
//   copy_rate: dst[i] = src[i] over vec4 elements: 16 bytes read and 16 written per invocation.
//
// Layout: flat arrays; one invocation per element, flat index from a grid_1d grid of workgroups
// of 256: i = (wid.y * num_workgroups.x + wid.x) * 256 + lid.x, bounds-checked against n.

struct FmaParams {
    n: u32, iters: u32, a: f32, b: f32,
}

struct CopyParams {
    n: u32, pad0: u32, pad1: u32, pad2: u32,
}

@group(0) @binding(0) var<uniform> fp: FmaParams;
@group(0) @binding(1) var<storage, read_write> fma_out: array<f32>;

@compute @workgroup_size(256)
fn fma_rate(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    if (i >= fp.n) {
        return;
    }
    var acc: array<vec4<f32>, 8>;
    for (var j = 0u; j < 8u; j++) {
        let s = i + 4u * j;
        acc[j] = vec4<f32>(f32(s & 255u), f32((s + 1u) & 255u), f32((s + 2u) & 255u), f32((s + 3u) & 255u)) / 256.0;
    }
    let a = vec4<f32>(fp.a);
    let b = vec4<f32>(fp.b);
    for (var r = 0u; r < fp.iters; r++) {
        acc[0] = fma(acc[0], a, b);
        acc[1] = fma(acc[1], a, b);
        acc[2] = fma(acc[2], a, b);
        acc[3] = fma(acc[3], a, b);
        acc[4] = fma(acc[4], a, b);
        acc[5] = fma(acc[5], a, b);
        acc[6] = fma(acc[6], a, b);
        acc[7] = fma(acc[7], a, b);
    }
    var total = 0.0;
    for (var j = 0u; j < 8u; j++) {
        total += (acc[j].x + acc[j].y) + (acc[j].z + acc[j].w);
    }
    fma_out[i] = total;
}

@group(0) @binding(0) var<uniform> cp: CopyParams;
@group(0) @binding(1) var<storage, read> copy_src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> copy_dst: array<vec4<f32>>;

@compute @workgroup_size(256)
fn copy_rate(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    if (i >= cp.n) {
        return;
    }
    copy_dst[i] = copy_src[i];
}
