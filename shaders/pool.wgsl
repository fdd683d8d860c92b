// pool.wgsl: 2-D max and average pooling over NCHW, one invocation per output element.
//
//   max_pool2d: y[n, c, oy, ox] = max over the window of x[n, c, oy*s - p + ky, ox*s - p + kx]
//               (padding never wins: positions outside the image are skipped, like -inf)
//   avg_pool2d: y[n, c, oy, ox] = (sum over the window's positions inside the image) / (their count)
//               i.e. torch's count_include_pad=False; with p = 0 the count is always kh * kw
// Window kh x kw, stride s, padding p (same along both axes), output size (H + 2p - k) / s + 1.
// Sums run over ky, then kx (the CPU reference uses the same order). Bandwidth-bound.

struct Params {
    numel: u32, h: u32, w: u32, ho: u32,
    wo: u32, kh: u32, kw: u32, stride: u32,
    pad: u32, _p0: u32, _p1: u32, _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn max_pool2d(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    let ox = i % p.wo;
    let oy = (i / p.wo) % p.ho;
    let plane = (i / (p.wo * p.ho)) * p.h * p.w;
    var m = -3.4028235e38;
    for (var ky = 0u; ky < p.kh; ky++) {
        let iy = i32(oy * p.stride + ky) - i32(p.pad);
        if (iy < 0 || iy >= i32(p.h)) {
            continue;
        }
        for (var kx = 0u; kx < p.kw; kx++) {
            let ix = i32(ox * p.stride + kx) - i32(p.pad);
            if (ix < 0 || ix >= i32(p.w)) {
                continue;
            }
            m = max(m, x[plane + u32(iy) * p.w + u32(ix)]);
        }
    }
    y[i] = m;
}

@compute @workgroup_size(256)
fn avg_pool2d(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    let ox = i % p.wo;
    let oy = (i / p.wo) % p.ho;
    let plane = (i / (p.wo * p.ho)) * p.h * p.w;
    var sum = 0.0;
    var count = 0u;
    for (var ky = 0u; ky < p.kh; ky++) {
        let iy = i32(oy * p.stride + ky) - i32(p.pad);
        if (iy < 0 || iy >= i32(p.h)) {
            continue;
        }
        for (var kx = 0u; kx < p.kw; kx++) {
            let ix = i32(ox * p.stride + kx) - i32(p.pad);
            if (ix < 0 || ix >= i32(p.w)) {
                continue;
            }
            sum += x[plane + u32(iy) * p.w + u32(ix)];
            count += 1u;
        }
    }
    y[i] = sum / f32(count);
}
