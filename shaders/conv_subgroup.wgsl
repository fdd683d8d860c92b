// conv_subgroup.wgsl: the convolution weight gradient's partial sums, reduced with subgroup
// operations (variant "sg4xkk" of conv2d_grad_weight in conv.wgsl: same Params, bindings, chunks
// and partial layout, and the same conv2d_grad_weight_reduce adds the parts in order).
//
//   dw_partial[part, co, ci, ky, kx] = sum_{e in part} dy[n, co, oy, ox] * x[n, ci, oy*s - p + ky, ox*s - p + kx]
//
// over e = (n, oy, ox) flattened, GRAD_W_CHUNK consecutive positions per part, zero padding p,
// stride s, K <= 3; x is f32 or bit-packed spikes (p.x_spikes, as in conv.wgsl).
// A workgroup owns one input channel ci and 4 output channels co0..co0+3 with all K*K taps. Its
// 64 invocations split the part's positions (invocation l takes e = start + l, start + l + 64,
// ...), so neighbouring invocations read neighbouring dy and x; then each subgroup adds its
// invocations' sums with subgroupAdd and the first K*K*4 invocations add the subgroups' sums in
// subgroup order. No atomics: the order depends only on the device's subgroup size, so one
// adapter gives the same bits run to run (they differ from the sequential CPU reference by
// rounding). It needs Features::SUBGROUP, which is why it is not in conv.wgsl: a module that
// uses subgroups fails to compile on a device without them.
// Grid: x = Cin, y = ceil(Cout / 4), z = parts.

struct Params {
    n: u32, cin: u32, h: u32, w: u32,
    cout: u32, ho: u32, wo: u32, k: u32,
    stride: u32, pad: u32, wo_groups: u32, x_spikes: u32,
    kw: u32, pad_w: u32, epilogue: u32, emb_rows: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> x_saved: array<u32>;
@group(0) @binding(3) var<storage, read_write> dw_partial: array<f32>;

// Positions per part; filled from Rust (src/ops/conv.rs GRAD_W_CHUNK), no default.
override GRAD_W_CHUNK: u32;

// [subgroup][tap] sums of the 4 output channels: room for 64 subgroups of one invocation.
var<workgroup> sg_sums: array<vec4<f32>, 576>;

fn x_saved_at(i: u32) -> f32 {
    if (p.x_spikes != 0u) {
        return f32((x_saved[i / 32u] >> (i % 32u)) & 1u);
    }
    return bitcast<f32>(x_saved[i]);
}

@compute @workgroup_size(64)
fn conv2d_grad_weight_subgroup(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>,
                               @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_id) sg: u32,
                               @builtin(num_subgroups) nsg: u32) {
    let ci = wid.x;
    let co0 = wid.y * 4u;
    let part = wid.z;
    var acc: array<vec4<f32>, 9>;
    for (var j = 0u; j < 9u; j++) {
        acc[j] = vec4<f32>(0.0);
    }
    let plane = p.ho * p.wo;
    let end = min(p.n * plane, (part + 1u) * GRAD_W_CHUNK);
    var co: vec4<u32>;
    for (var j = 0u; j < 4u; j++) {
        co[j] = min(co0 + j, p.cout - 1u);
    }
    for (var e = part * GRAD_W_CHUNK + li; e < end; e += 64u) {
        let n = e / plane;
        let pix = e % plane;
        let oy = pix / p.wo;
        let ox = pix % p.wo;
        let dbase = n * p.cout * plane + pix;
        let g = vec4<f32>(dy[dbase + co[0] * plane], dy[dbase + co[1] * plane], dy[dbase + co[2] * plane],
                          dy[dbase + co[3] * plane]);
        let xplane = (n * p.cin + ci) * p.h * p.w;
        for (var ky = 0u; ky < p.k; ky++) {
            let iy = i32(oy * p.stride + ky) - i32(p.pad);
            if (iy < 0 || iy >= i32(p.h)) {
                continue;
            }
            let xrow = xplane + u32(iy) * p.w;
            for (var kx = 0u; kx < p.k; kx++) {
                let ix = i32(ox * p.stride + kx) - i32(p.pad);
                let v = select(0.0, x_saved_at(xrow + u32(clamp(ix, 0, i32(p.w) - 1))), ix >= 0 && ix < i32(p.w));
                acc[ky * p.k + kx] += v * g;
            }
        }
    }
    let kk = p.k * p.k;
    for (var tap = 0u; tap < kk; tap++) {
        let s = subgroupAdd(acc[tap]);
        if (lane == 0u) {
            sg_sums[sg * 9u + tap] = s;
        }
    }
    workgroupBarrier();
    if (li < 4u * kk) {
        let j = li / kk;
        let tap = li % kk;
        var total = 0.0;
        for (var s = 0u; s < nsg; s++) {
            total += sg_sums[s * 9u + tap][j];
        }
        if (co0 + j < p.cout) {
            dw_partial[part * p.cout * p.cin * kk + ((co0 + j) * p.cin + ci) * kk + tap] = total;
        }
    }
}
