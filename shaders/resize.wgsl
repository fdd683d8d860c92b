// resize.wgsl: bilinear resize of NCHW images as torch's F.interpolate(mode="bilinear",
// align_corners=False, antialias=False), fused with the FID input preprocessing.
//
//   resize_bilinear: y[n, c, oy, ox] = mul * bilerp(x[n, c % Cin], oy, ox) + add
//   source row:  sy = max(scale_h * (oy + 0.5) - 0.5, 0), scale_h = H / Ho (f32, as torch);
//                y0 = floor(sy), y1 = min(y0 + 1, H - 1), ly = clamp(sy - y0, 0, 1); columns alike
//   bilerp = (x[y0, x0] (1 - lx) + x[y0, x1] lx) (1 - ly) + (x[y1, x0] (1 - lx) + x[y1, x1] lx) ly
// in that order (torch's CPU kernel: width inside, height outside). Output channels beyond Cin
// repeat the input's (grayscale -> RGB when Cin = 1). pytorch-fid scales [0, 1] to [-1, 1] after
// resizing: mul = 2, add = -1 (2v is exact, so one rounding as in torch's `* 2 - 1`).

struct Params {
    numel: u32, cin: u32, h: u32, w: u32,
    cout: u32, ho: u32, wo: u32, scale_h: f32,
    scale_w: f32, mul: f32, add: f32, _p0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

// Lower index, upper index and weight of the upper one along an axis of `size` input pixels.
fn source(o: u32, scale: f32, size: u32) -> vec3<f32> {
    let s = max(scale * (f32(o) + 0.5) - 0.5, 0.0);
    let i0 = min(u32(s), size - 1u);
    let i1 = min(i0 + 1u, size - 1u);
    let l = clamp(s - f32(i0), 0.0, 1.0);
    return vec3<f32>(f32(i0), f32(i1), l);
}

@compute @workgroup_size(256)
fn resize_bilinear(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.numel) {
        return;
    }
    let ox = i % p.wo;
    let oy = (i / p.wo) % p.ho;
    let c = (i / (p.wo * p.ho)) % p.cout;
    let n = i / (p.wo * p.ho * p.cout);
    let plane = (n * p.cin + c % p.cin) * p.h * p.w;
    let sy = source(oy, p.scale_h, p.h);
    let sx = source(ox, p.scale_w, p.w);
    let r0 = plane + u32(sy.x) * p.w;
    let r1 = plane + u32(sy.y) * p.w;
    let top = x[r0 + u32(sx.x)] * (1.0 - sx.z) + x[r0 + u32(sx.y)] * sx.z;
    let bottom = x[r1 + u32(sx.x)] * (1.0 - sx.z) + x[r1 + u32(sx.y)] * sx.z;
    let v = top * (1.0 - sy.z) + bottom * sy.z;
    y[i] = v * p.mul + p.add;
}
