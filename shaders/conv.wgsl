// conv.wgsl: 2-D convolution, NCHW activations, PyTorch weight layout [Cout, Cin, K, K], optional bias.
//
//   y[n, co, oy, ox] = bias[co] + sum_{ci, ky, kx} w[co, ci, ky, kx] * x[n, ci, oy*s - p + ky, ox*s - p + kx]
//
// with zero padding p and stride s; K is 1 or 3 in the SDDPM U-Net but any K works. The sum runs
// over ci, then ky, then kx, and the bias is added last (the CPU reference uses the same order).
// The forward also takes non-square kernels [Cout, Cin, KH = k, KW = kw] with padding (pad, pad_w);
// the backward kernels assume kw = k, pad_w = pad and no ReLU.
//
// Epilogue: every forward kernel stores through store_output, which adds and applies, in this
// float order and each only where its bit of p.epilogue is set:
//   y = relu((((conv + bias[co]) + emb[n % p.emb_rows, co]) + residual[n, co, oy, ox]))
// emb [B, Cout] is a per-(image, channel) addend broadcast over pixels (the time embedding's
// projection; images are time-major, N = T*B, so image n reads row n % B), residual
// [N, Cout, Ho, Wo] an elementwise one; the ReLU is Inception-v3's. The order is that of the
// separate add_channel and add passes they replace, so fusing them changes no bit.
//
// Register blocking: each invocation owns an 8x4 tile, 8 output channels x 4 consecutive output
// columns of one output row, so every loaded input value feeds 8 FMAs and every loaded weight 4.
// Neighbouring invocations take neighbouring column groups (coalesced input loads); all
// invocations of a workgroup share the same 4 output channels (weight loads are broadcasts).
// No shared memory: barriers are cheap on GPUs but ruinous on lavapipe, and L1 serves the reuse.
// Grid: x = output rows * column groups (64 per workgroup), y = ceil(Cout / 8), z = N.
//
// Variant "igemm32" of the forward (conv2d_igemm; the tuner picks between it and conv2d): a
// workgroup-tiled implicit GEMM, C[co, pixel] = sum_r W[co, r] * X[r, pixel] with
// r = (ci, ky, kx) flattened (the same ascending order; padding taps and the last chunk's tail
// add exact zeros). A workgroup owns a 32 x 32 tile of output channels x output pixels (of one
// image); the K loop stages 8 reduction steps of weights and im2col'd inputs through workgroup
// memory per barrier pair, each of the 64 invocations loads 4 of each and computes a 4x4 block.
// Grid: x = ceil(Ho*Wo / 32), y = ceil(Cout / 32), z = N.
// Variants "db64x64", "db128x128", "db128x128k16" (conv2d_igemm_db): the same implicit GEMM with
// larger tiles, 8x8 outputs per invocation, two workgroup-memory stages and vec4 weight loads;
// see its section below.
// x (and the weight gradient's saved x) is either f32 or bit-packed spikes (graph dtype Spike:
// element e at bit e % 32 of word e / 32), as p.x_spikes says; both are bound as u32 words, and a
// spike reads as exactly 0.0 or 1.0, so a conv over packed spikes gives the same bits as over
// f32 spikes while reading 32x fewer bytes.
//
// Backward (same Params, same bindings order: inputs then the written gradient):
//   conv2d_grad_input_igemm: variant "igemm32" of conv2d_grad_input, the same tiling with rows =
//                       input channels, columns = input pixels, r = (co, ky, kx) ascending (the
//                       reference's order; taps that hit no output add exact zeros).
//                       Grid: x = ceil(H*W / 32), y = ceil(Cin / 32), z = N.
//   conv2d_grad_input_igemm_db: variants "db64x64", "db128x128", "db128x128k16" of
//                       conv2d_grad_input: the forward's double-buffered tiles on that GEMM.
//   conv2d_grad_weight_igemm: variant "igemm32" of conv2d_grad_weight (same chunks, same partial
//                       layout, same reduce): rows = output channels, columns = r = (ci, ky, kx),
//                       K = the chunk's (n, oy, ox) ascending, 8 staged per barrier pair.
//                       Grid: x = ceil(Cin*K*K / 32), y = ceil(Cout / 32), z = parts.
//   (variant "sg4xkk" of conv2d_grad_weight, with subgroup reductions, is in conv_subgroup.wgsl:
//                       a module using subgroups does not compile on a device without them.)
//   conv2d_grad_input:  dx[n, ci, iy, ix] = sum_{co, ky, kx} w[co, ci, ky, kx] * dy[n, co, oy, ox]
//                       over the (oy, ox) with oy*s - p + ky = iy (the transposed convolution);
//                       8 input channels x 4 input columns per invocation.
//                       Grid: x = H * ceil(W / 4) (64 per workgroup), y = ceil(Cin / 8), z = N.
//   conv2d_grad_weight: dw[co, ci, ky, kx] = sum_{n, oy, ox} dy[n, co, oy, ox] * x[n, ci, oy*s-p+ky, ox*s-p+kx]
//                       in two deterministic passes (no atomics): each invocation sums all K*K taps
//                       (K <= 3) of 4 output channels x one ci over one chunk of GRAD_W_CHUNK consecutive
//                       (n, oy, ox) into dw_partial[part]; conv2d_grad_weight_reduce adds the
//                       parts in order. Chunking gives real GPUs Cout*Cin*parts invocations to
//                       work with, and keeps every invocation under lavapipe's cap of 65535 loop
//                       iterations (gallivm stops longer loops silently).
//                       Grid: x = ceil(Cin / 64), y = ceil(Cout / 4), z = parts.
// The bias gradient is a channel sum (reduce.wgsl).

// src/ops/conv.rs ConvParams mirrors this struct (tests/shaders.rs checks the layout).
struct Params {
    n: u32, cin: u32, h: u32, w: u32,
    cout: u32, ho: u32, wo: u32, k: u32,
    stride: u32, pad: u32, wo_groups: u32, x_spikes: u32,
    kw: u32, pad_w: u32, epilogue: u32, emb_rows: u32,
}

// Bits of p.epilogue (src/ops/conv.rs EPI_*).
const EPI_BIAS: u32 = 1u;
const EPI_EMB: u32 = 2u;
const EPI_RESIDUAL: u32 = 4u;
const EPI_RELU: u32 = 8u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> wt: array<f32>;
// The epilogue's operands; a node without one binds a placeholder there, never read.
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> emb: array<f32>;
@group(0) @binding(5) var<storage, read> residual: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

// The one place a forward kernel writes y: output `pixel` (oy * Wo + ox) of channel co of image
// n, from its accumulated sum `acc` (see the header for the order of the additions).
fn store_output(n: u32, co: u32, pixel: u32, acc: f32) {
    let e = p.epilogue;
    var b = 0.0;
    if ((e & EPI_BIAS) != 0u) {
        b = bias[co];
    }
    var v = acc + b;
    if ((e & EPI_EMB) != 0u) {
        v += emb[(n % p.emb_rows) * p.cout + co];
    }
    let i = (n * p.cout + co) * p.ho * p.wo + pixel;
    if ((e & EPI_RESIDUAL) != 0u) {
        v += residual[i];
    }
    if ((e & EPI_RELU) != 0u) {
        v = max(v, 0.0);
    }
    y[i] = v;
}

// x[xrow + ix], or 0 in the padding. (The 4 loads of a tile are written out, not looped: lavapipe
// caps an invocation at 65535 loop iterations in total, and Cin * K * K already counts.)
fn load_x(xrow: u32, ix: i32) -> f32 {
    let v = bitcast<f32>(x[xrow + u32(clamp(ix, 0, i32(p.w) - 1))]);
    return select(0.0, v, ix >= 0 && ix < i32(p.w));
}

// The tile's 4 inputs x[xrow + ix + q * stride], q = 0..3 (0 in the padding). Packed spikes come
// from one 32-bit window cut out of the two words holding them (for strides up to 9), instead
// of a word load and a bit extraction per value.
fn load_x4(xrow: u32, ix: i32) -> vec4<f32> {
    let s = i32(p.stride);
    if (p.x_spikes == 0u) {
        return vec4<f32>(load_x(xrow, ix), load_x(xrow, ix + s), load_x(xrow, ix + 2 * s), load_x(xrow, ix + 3 * s));
    }
    let e0 = i32(xrow) + ix;
    let first = u32(max(e0, 0));
    let last_word = arrayLength(&x) - 1u;
    let shift = first % 32u;
    let w0 = x[min(first / 32u, last_word)];
    let w1 = x[min(first / 32u + 1u, last_word)];
    let window = (w0 >> shift) | select(0u, w1 << (32u - shift), shift != 0u);
    // Written out, not looped (lavapipe's loop-iteration cap, see load_x). Columns before
    // `first` are padding (only at e0 < 0); their shift wraps and the select drops them.
    let off = e0 - i32(first);
    let b = vec4<u32>(window >> u32(off), window >> u32(off + s), window >> u32(off + 2 * s), window >> u32(off + 3 * s));
    let col = vec4<i32>(ix, ix + s, ix + 2 * s, ix + 3 * s);
    return select(vec4<f32>(0.0), vec4<f32>(b & vec4<u32>(1u)), col >= vec4<i32>(0) & col < vec4<i32>(i32(p.w)));
}

@compute @workgroup_size(64)
fn conv2d(@builtin(global_invocation_id) gid: vec3<u32>) {
    let tile = gid.x;
    if (tile >= p.ho * p.wo_groups) {
        return;
    }
    let oy = tile / p.wo_groups;
    let ox0 = (tile % p.wo_groups) * 4u;
    let co0 = gid.y * 8u;
    let n = gid.z;

    // Weight offsets of the 8 output channels; channels past Cout read channel Cout-1 and are
    // never stored.
    let wstride = p.cin * p.k * p.kw;
    var wa: vec4<u32>;
    var wb: vec4<u32>;
    for (var j = 0u; j < 4u; j++) {
        wa[j] = min(co0 + j, p.cout - 1u) * wstride;
        wb[j] = min(co0 + 4u + j, p.cout - 1u) * wstride;
    }

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    let ix0 = i32(ox0 * p.stride) - i32(p.pad_w);
    for (var ci = 0u; ci < p.cin; ci++) {
        let xplane = (n * p.cin + ci) * p.h * p.w;
        for (var ky = 0u; ky < p.k; ky++) {
            let iy = i32(oy * p.stride + ky) - i32(p.pad);
            if (iy < 0 || iy >= i32(p.h)) {
                continue;
            }
            let xrow = xplane + u32(iy) * p.w;
            let wk = (ci * p.k + ky) * p.kw;
            for (var kx = 0u; kx < p.kw; kx++) {
                let xv = load_x4(xrow, ix0 + i32(kx));
                let wi = wk + kx;
                acc0 += wt[wa[0] + wi] * xv;
                acc1 += wt[wa[1] + wi] * xv;
                acc2 += wt[wa[2] + wi] * xv;
                acc3 += wt[wa[3] + wi] * xv;
                acc4 += wt[wb[0] + wi] * xv;
                acc5 += wt[wb[1] + wi] * xv;
                acc6 += wt[wb[2] + wi] * xv;
                acc7 += wt[wb[3] + wi] * xv;
            }
        }
    }

    let accs = array<vec4<f32>, 8>(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7);
    for (var j = 0u; j < 8u; j++) {
        let co = co0 + j;
        if (co >= p.cout) {
            break;
        }
        for (var q = 0u; q < 4u; q++) {
            if (ox0 + q < p.wo) {
                store_output(n, co, oy * p.wo + ox0 + q, accs[j][q]);
            }
        }
    }
}

// ---- forward, tiled implicit GEMM ---------------------------------------------------------------

// x[i] as f32, whether x is f32 or packed spikes (p.x_spikes).
fn x_at(i: u32) -> f32 {
    if (p.x_spikes != 0u) {
        return f32((x[i / 32u] >> (i % 32u)) & 1u);
    }
    return bitcast<f32>(x[i]);
}

// Tile sizes of conv2d_igemm (src/ops/conv.rs IGEMM_TILE mirrors the 32 for the grid).
const IG_TILE: u32 = 32u;
const IG_TK: u32 = 8u;
var<workgroup> ig_w: array<f32, 256>; // [IG_TK][IG_TILE] weights: row r, column output channel
var<workgroup> ig_x: array<f32, 256>; // [IG_TK][IG_TILE] im2col inputs: row r, column output pixel

@compute @workgroup_size(64)
fn conv2d_igemm(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let kk = p.k * p.k;
    let kdim = p.cin * kk;
    let npix = p.ho * p.wo;
    let co0 = wid.y * IG_TILE;
    let px0 = wid.x * IG_TILE;
    let n = wid.z;
    let tm = (li / 8u) * 4u; // this invocation's 4 output channels within the tile
    let tn = (li % 8u) * 4u; // and its 4 output pixels
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var r0 = 0u; r0 < kdim; r0 += IG_TK) {
        for (var q = 0u; q < 4u; q++) {
            let e = li * 4u + q;
            let r = r0 + e / IG_TILE;
            let m = e % IG_TILE;
            var wv = 0.0;
            if (r < kdim && co0 + m < p.cout) {
                wv = wt[(co0 + m) * kdim + r];
            }
            ig_w[e] = wv;
            var xv = 0.0;
            let pix = px0 + m;
            if (r < kdim && pix < npix) {
                let ci = r / kk;
                let ky = (r % kk) / p.k;
                let kx = r % p.k;
                let iy = i32((pix / p.wo) * p.stride + ky) - i32(p.pad);
                let ix = i32((pix % p.wo) * p.stride + kx) - i32(p.pad);
                if (iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {
                    xv = x_at(((n * p.cin + ci) * p.h + u32(iy)) * p.w + u32(ix));
                }
            }
            ig_x[e] = xv;
        }
        workgroupBarrier();
        for (var kr = 0u; kr < IG_TK; kr++) {
            let row = kr * IG_TILE;
            let xv = vec4<f32>(ig_x[row + tn], ig_x[row + tn + 1u], ig_x[row + tn + 2u], ig_x[row + tn + 3u]);
            acc0 += ig_w[row + tm] * xv;
            acc1 += ig_w[row + tm + 1u] * xv;
            acc2 += ig_w[row + tm + 2u] * xv;
            acc3 += ig_w[row + tm + 3u] * xv;
        }
        workgroupBarrier();
    }
    let accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let co = co0 + tm + i;
        if (co >= p.cout) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let pix = px0 + tn + j;
            if (pix < npix) {
                store_output(n, co, pix, accs[i][j]);
            }
        }
    }
}

// ---- forward, double-buffered implicit GEMM -----------------------------------------------------

// Variants "db*" of the forward (conv2d_igemm_db): the implicit GEMM of conv2d_igemm with a
// workgroup tile of DB_BM output channels x DB_BN output pixels, DB_WG = (DB_BM / 8) * (DB_BN / 8)
// invocations computing 8 x 8 outputs each, and two workgroup-memory stages of DB_BK reduction
// steps: each iteration issues the global loads of chunk c into registers, runs the FMAs of
// chunk c - 1 from one stage, then stores chunk c into the other stage, with one barrier per
// chunk. The sum runs over r = (ci, ky, kx) ascending as in conv2d. Weights are read as vec4
// along r where a row of Cin*K*K is aligned (else scalar, at the edges too); inputs of 1x1
// stride-1 convs over packed spikes come 4 pixels per word read; every output is stored through
// store_output (the epilogue). The four sizes are filled from Rust (src/ops/conv.rs DB_TILES), with no defaults, so a pipeline without them fails to build.
// Grid: x = ceil(Ho*Wo / DB_BN), y = ceil(Cout / DB_BM), z = N.
override DB_BM: u32;
override DB_BN: u32;
override DB_BK: u32;
override DB_WG: u32;
// Two stages of [DB_BK][DB_BM] weights and [DB_BK][DB_BN] im2col'd inputs, vec4 along m and n.
var<workgroup> db_w: array<vec4<f32>, DB_BK * DB_BM / 2u>;
var<workgroup> db_x: array<vec4<f32>, DB_BK * DB_BN / 2u>;

// The weights as vec4: the node offers the db variants only when Cout*Cin*K*K is a multiple of
// 4, so the binding holds whole vec4s and every weight is reachable through wt4_at.
@group(0) @binding(2) var<storage, read> wt4: array<vec4<f32>>;

fn wt4_at(i: u32) -> f32 {
    return wt4[i / 4u][i % 4u];
}

// Weights w[co, r .. r + 3] (r a multiple of 4; 0 past Cin*K*K or Cout).
fn db_fetch_w(co: u32, r: u32, kdim: u32) -> vec4<f32> {
    if (co >= p.cout || r >= kdim) {
        return vec4<f32>(0.0);
    }
    let i = co * kdim + r;
    if (kdim % 4u == 0u) {
        return wt4[i / 4u];
    }
    let last = arrayLength(&wt4) * 4u - 1u;
    let v = vec4<f32>(wt4_at(i), wt4_at(min(i + 1u, last)), wt4_at(min(i + 2u, last)), wt4_at(min(i + 3u, last)));
    return select(vec4<f32>(0.0), v, vec4<u32>(r) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(kdim));
}

// The im2col value of reduction step (ci, ky, kx) at output pixel pix of image n (0 in the padding
// and past the last pixel).
fn db_x1(plane: u32, ky: u32, kx: u32, pix: u32, npix: u32) -> f32 {
    let iy = i32((pix / p.wo) * p.stride + ky) - i32(p.pad);
    let ix = i32((pix % p.wo) * p.stride + kx) - i32(p.pad);
    if (pix >= npix || iy < 0 || iy >= i32(p.h) || ix < 0 || ix >= i32(p.w)) {
        return 0.0;
    }
    return x_at(plane + u32(iy) * p.w + u32(ix));
}

// The im2col values of reduction step r at output pixels pix .. pix + 3 of image n.
fn db_fetch_x(n: u32, r: u32, pix: u32, kdim: u32, npix: u32) -> vec4<f32> {
    if (r >= kdim) {
        return vec4<f32>(0.0);
    }
    let kk = p.k * p.k;
    let ci = r / kk;
    let plane = (n * p.cin + ci) * p.h * p.w;
    if (p.x_spikes != 0u && kk == 1u && p.stride == 1u && p.pad == 0u && pix + 3u < npix) {
        // 1x1 stride 1: the 4 pixels are 4 consecutive bits, in one word when aligned.
        let i = plane + pix;
        if (i % 4u == 0u) {
            let b = x[i / 32u] >> (i % 32u);
            return vec4<f32>(vec4<u32>(b, b >> 1u, b >> 2u, b >> 3u) & vec4<u32>(1u));
        }
    }
    let ky = (r % kk) / p.k;
    let kx = r % p.k;
    return vec4<f32>(db_x1(plane, ky, kx, pix, npix), db_x1(plane, ky, kx, pix + 1u, npix),
                     db_x1(plane, ky, kx, pix + 2u, npix), db_x1(plane, ky, kx, pix + 3u, npix));
}

// The FMAs of one stage: acc[2 i + j / 4][j % 4] += w[m = tm + i] * x[n = tn + j] for each of
// the DB_BK reduction steps; sw and sx are the stage's vec4 offsets plus tm / 4 and tn / 4.
fn db_fma(acc: ptr<function, array<vec4<f32>, 16>>, sw: u32, sx: u32) {
    for (var kr = 0u; kr < DB_BK; kr++) {
        let a0 = db_w[sw + kr * (DB_BM / 4u)];
        let a1 = db_w[sw + kr * (DB_BM / 4u) + 1u];
        let b0 = db_x[sx + kr * (DB_BN / 4u)];
        let b1 = db_x[sx + kr * (DB_BN / 4u) + 1u];
        (*acc)[0] += a0.x * b0;
        (*acc)[1] += a0.x * b1;
        (*acc)[2] += a0.y * b0;
        (*acc)[3] += a0.y * b1;
        (*acc)[4] += a0.z * b0;
        (*acc)[5] += a0.z * b1;
        (*acc)[6] += a0.w * b0;
        (*acc)[7] += a0.w * b1;
        (*acc)[8] += a1.x * b0;
        (*acc)[9] += a1.x * b1;
        (*acc)[10] += a1.y * b0;
        (*acc)[11] += a1.y * b1;
        (*acc)[12] += a1.z * b0;
        (*acc)[13] += a1.z * b1;
        (*acc)[14] += a1.w * b0;
        (*acc)[15] += a1.w * b1;
    }
}

// Row m and reduction step k of weight group g (4 consecutive steps of one row per group).
fn db_group_w(g: u32) -> vec2<u32> {
    return vec2<u32>(g / (DB_BK / 4u), (g % (DB_BK / 4u)) * 4u);
}

// Reduction step k and column n of input group g (4 consecutive columns of one step per group).
fn db_group_x(g: u32) -> vec2<u32> {
    return vec2<u32>(g / (DB_BN / 4u), (g % (DB_BN / 4u)) * 4u);
}

// Stores weight group g (steps k .. k + 3 of row m) into stage `stage`.
fn db_put_w(stage: u32, g: u32, v: vec4<f32>) {
    let mk = db_group_w(g);
    let e = (stage * DB_BK + mk.y) * DB_BM + mk.x;
    db_w[e / 4u][mk.x % 4u] = v.x;
    db_w[(e + DB_BM) / 4u][mk.x % 4u] = v.y;
    db_w[(e + 2u * DB_BM) / 4u][mk.x % 4u] = v.z;
    db_w[(e + 3u * DB_BM) / 4u][mk.x % 4u] = v.w;
}

// Stores input group g (columns n .. n + 3 of step k) into stage `stage`.
fn db_put_x(stage: u32, g: u32, v: vec4<f32>) {
    let kn = db_group_x(g);
    db_x[(stage * DB_BK + kn.x) * (DB_BN / 4u) + kn.y / 4u] = v;
}

// The rest of iteration c of the double-buffered loop, once chunk c (if c < chunks) is in
// registers pw, px: the FMAs of chunk c - 1 from its stage, then chunk c into the other stage
// (read by the FMAs of the next iteration, after the barrier; its previous contents were read
// before the last one), then the iteration's one barrier.
fn db_advance(acc: ptr<function, array<vec4<f32>, 16>>, pw: array<vec4<f32>, 2>, px: array<vec4<f32>, 2>, c: u32,
              chunks: u32, li: u32, tm: u32, tn: u32) {
    if (c > 0u) {
        let stage = (c - 1u) % 2u;
        db_fma(acc, stage * DB_BK * (DB_BM / 4u) + tm / 4u, stage * DB_BK * (DB_BN / 4u) + tn / 4u);
    }
    if (c < chunks) {
        for (var q = 0u; q < DB_BK * DB_BM / (4u * DB_WG); q++) {
            db_put_w(c % 2u, li + q * DB_WG, pw[q]);
        }
        for (var q = 0u; q < DB_BK * DB_BN / (4u * DB_WG); q++) {
            db_put_x(c % 2u, li + q * DB_WG, px[q]);
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(DB_WG)
fn conv2d_igemm_db(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let kdim = p.cin * p.k * p.k;
    let npix = p.ho * p.wo;
    let co0 = wid.y * DB_BM;
    let px0 = wid.x * DB_BN;
    let n = wid.z;
    // vec4 groups each invocation loads per chunk (at most 2: see DB_TILES).
    let groups_w = DB_BK * DB_BM / (4u * DB_WG);
    let groups_x = DB_BK * DB_BN / (4u * DB_WG);
    let tm = (li / (DB_BN / 8u)) * 8u;
    let tn = (li % (DB_BN / 8u)) * 8u;
    var pw: array<vec4<f32>, 2>;
    var px: array<vec4<f32>, 2>;
    var acc: array<vec4<f32>, 16>;
    let chunks = (kdim + DB_BK - 1u) / DB_BK;
    for (var c = 0u; c <= chunks; c++) {
        // Global loads of chunk c, into registers.
        if (c < chunks) {
            for (var q = 0u; q < groups_w; q++) {
                let mk = db_group_w(li + q * DB_WG);
                pw[q] = db_fetch_w(co0 + mk.x, c * DB_BK + mk.y, kdim);
            }
            for (var q = 0u; q < groups_x; q++) {
                let kn = db_group_x(li + q * DB_WG);
                px[q] = db_fetch_x(n, c * DB_BK + kn.x, px0 + kn.y, kdim, npix);
            }
        }
        db_advance(&acc, pw, px, c, chunks, li, tm, tn);
    }
    for (var i = 0u; i < 8u; i++) {
        let co = co0 + tm + i;
        if (co >= p.cout) {
            break;
        }
        for (var j = 0u; j < 8u; j++) {
            let pix = px0 + tn + j;
            if (pix < npix) {
                store_output(n, co, pix, acc[i * 2u + j / 4u][j % 4u]);
            }
        }
    }
}

// ---- backward ---------------------------------------------------------------------------------

@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> wt_b: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

// dy[dyrow + tx / s] when tx lands on an output column, else 0.
fn load_dy(dyrow: u32, tx: i32) -> f32 {
    let ox = tx / i32(p.stride);
    let v = dy[dyrow + u32(clamp(ox, 0, i32(p.wo) - 1))];
    return select(0.0, v, tx >= 0 && tx % i32(p.stride) == 0 && ox < i32(p.wo));
}

@compute @workgroup_size(64)
fn conv2d_grad_input(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w_groups = (p.w + 3u) / 4u;
    let tile = gid.x;
    if (tile >= p.h * w_groups) {
        return;
    }
    let iy = tile / w_groups;
    let ix0 = (tile % w_groups) * 4u;
    let ci0 = gid.y * 8u;
    let n = gid.z;
    let kk = p.k * p.k;
    var wa: vec4<u32>;
    var wb: vec4<u32>;
    for (var j = 0u; j < 4u; j++) {
        wa[j] = min(ci0 + j, p.cin - 1u) * kk;
        wb[j] = min(ci0 + 4u + j, p.cin - 1u) * kk;
    }
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    for (var co = 0u; co < p.cout; co++) {
        let dyplane = (n * p.cout + co) * p.ho * p.wo;
        let wco = co * p.cin * kk;
        for (var ky = 0u; ky < p.k; ky++) {
            let ty = i32(iy + p.pad) - i32(ky);
            if (ty < 0 || ty % i32(p.stride) != 0 || ty / i32(p.stride) >= i32(p.ho)) {
                continue;
            }
            let dyrow = dyplane + u32(ty / i32(p.stride)) * p.wo;
            for (var kx = 0u; kx < p.k; kx++) {
                let tx = i32(ix0 + p.pad) - i32(kx);
                let dv = vec4<f32>(load_dy(dyrow, tx), load_dy(dyrow, tx + 1), load_dy(dyrow, tx + 2), load_dy(dyrow, tx + 3));
                let wi = wco + ky * p.k + kx;
                acc0 += wt_b[wa[0] + wi] * dv;
                acc1 += wt_b[wa[1] + wi] * dv;
                acc2 += wt_b[wa[2] + wi] * dv;
                acc3 += wt_b[wa[3] + wi] * dv;
                acc4 += wt_b[wb[0] + wi] * dv;
                acc5 += wt_b[wb[1] + wi] * dv;
                acc6 += wt_b[wb[2] + wi] * dv;
                acc7 += wt_b[wb[3] + wi] * dv;
            }
        }
    }
    let accs = array<vec4<f32>, 8>(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7);
    for (var j = 0u; j < 8u; j++) {
        let ci = ci0 + j;
        if (ci >= p.cin) {
            break;
        }
        let row = ((n * p.cin + ci) * p.h + iy) * p.w;
        for (var q = 0u; q < 4u; q++) {
            if (ix0 + q < p.w) {
                dx[row + ix0 + q] = accs[j][q];
            }
        }
    }
}

@compute @workgroup_size(64)
fn conv2d_grad_input_igemm(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let kk = p.k * p.k;
    let kdim = p.cout * kk;
    let npix = p.h * p.w;
    let ci0 = wid.y * IG_TILE;
    let px0 = wid.x * IG_TILE;
    let n = wid.z;
    let s = i32(p.stride);
    let tm = (li / 8u) * 4u;
    let tn = (li % 8u) * 4u;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var r0 = 0u; r0 < kdim; r0 += IG_TK) {
        for (var q = 0u; q < 4u; q++) {
            let e = li * 4u + q;
            let r = r0 + e / IG_TILE;
            let m = e % IG_TILE;
            let co = r / kk;
            let ky = (r % kk) / p.k;
            let kx = r % p.k;
            var wv = 0.0;
            if (r < kdim && ci0 + m < p.cin) {
                wv = wt_b[(co * p.cin + ci0 + m) * kk + ky * p.k + kx];
            }
            ig_w[e] = wv;
            var dv = 0.0;
            let pix = px0 + m;
            if (r < kdim && pix < npix) {
                let ty = i32(pix / p.w + p.pad) - i32(ky);
                let tx = i32(pix % p.w + p.pad) - i32(kx);
                if (ty >= 0 && tx >= 0 && ty % s == 0 && tx % s == 0 && ty / s < i32(p.ho) && tx / s < i32(p.wo)) {
                    dv = dy[((n * p.cout + co) * p.ho + u32(ty / s)) * p.wo + u32(tx / s)];
                }
            }
            ig_x[e] = dv;
        }
        workgroupBarrier();
        for (var kr = 0u; kr < IG_TK; kr++) {
            let row = kr * IG_TILE;
            let dv = vec4<f32>(ig_x[row + tn], ig_x[row + tn + 1u], ig_x[row + tn + 2u], ig_x[row + tn + 3u]);
            acc0 += ig_w[row + tm] * dv;
            acc1 += ig_w[row + tm + 1u] * dv;
            acc2 += ig_w[row + tm + 2u] * dv;
            acc3 += ig_w[row + tm + 3u] * dv;
        }
        workgroupBarrier();
    }
    let accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let ci = ci0 + tm + i;
        if (ci >= p.cin) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let pix = px0 + tn + j;
            if (pix < npix) {
                dx[(n * p.cin + ci) * npix + pix] = accs[i][j];
            }
        }
    }
}

// Variants "db*" of conv2d_grad_input (conv2d_grad_input_igemm_db): conv2d_igemm_db's tiles,
// stages and loop on the transposed GEMM of conv2d_grad_input_igemm: rows m = input channels,
// columns n = input pixels, r = (co, ky, kx) ascending. Weights are gathered with scalar loads
// (a row's steps stride over Cout); taps that hit no output add exact zeros.
// Grid: x = ceil(H*W / DB_BN), y = ceil(Cin / DB_BM), z = N.

// w[co, ci, ky, kx] of reduction step r = (co, ky, kx), 0 past Cout*K*K.
fn db_wt1(ci: u32, r: u32, kdim: u32) -> f32 {
    let kk = p.k * p.k;
    if (r >= kdim) {
        return 0.0;
    }
    return wt_b[((r / kk) * p.cin + ci) * kk + r % kk];
}

// dy[n, co, oy, ox] feeding input pixel pix through tap (ky, kx), 0 where none does.
fn db_dy1(dyplane: u32, ky: u32, kx: u32, pix: u32, npix: u32) -> f32 {
    let s = i32(p.stride);
    let ty = i32(pix / p.w + p.pad) - i32(ky);
    let tx = i32(pix % p.w + p.pad) - i32(kx);
    if (pix >= npix || ty < 0 || tx < 0 || ty % s != 0 || tx % s != 0 || ty / s >= i32(p.ho) || tx / s >= i32(p.wo)) {
        return 0.0;
    }
    return dy[dyplane + u32(ty / s) * p.wo + u32(tx / s)];
}

@compute @workgroup_size(DB_WG)
fn conv2d_grad_input_igemm_db(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let kk = p.k * p.k;
    let kdim = p.cout * kk;
    let npix = p.h * p.w;
    let ci0 = wid.y * DB_BM;
    let px0 = wid.x * DB_BN;
    let n = wid.z;
    let groups_w = DB_BK * DB_BM / (4u * DB_WG);
    let groups_x = DB_BK * DB_BN / (4u * DB_WG);
    let tm = (li / (DB_BN / 8u)) * 8u;
    let tn = (li % (DB_BN / 8u)) * 8u;
    var pw: array<vec4<f32>, 2>;
    var px: array<vec4<f32>, 2>;
    var acc: array<vec4<f32>, 16>;
    let chunks = (kdim + DB_BK - 1u) / DB_BK;
    for (var c = 0u; c <= chunks; c++) {
        if (c < chunks) {
            for (var q = 0u; q < groups_w; q++) {
                let mk = db_group_w(li + q * DB_WG);
                let ci = ci0 + mk.x;
                let r = c * DB_BK + mk.y;
                if (ci < p.cin) {
                    pw[q] = vec4<f32>(db_wt1(ci, r, kdim), db_wt1(ci, r + 1u, kdim), db_wt1(ci, r + 2u, kdim),
                                      db_wt1(ci, r + 3u, kdim));
                } else {
                    pw[q] = vec4<f32>(0.0);
                }
            }
            for (var q = 0u; q < groups_x; q++) {
                let kn = db_group_x(li + q * DB_WG);
                let r = c * DB_BK + kn.x;
                let pix = px0 + kn.y;
                if (r < kdim) {
                    let dyplane = (n * p.cout + r / kk) * p.ho * p.wo;
                    let ky = (r % kk) / p.k;
                    let kx = r % p.k;
                    px[q] = vec4<f32>(db_dy1(dyplane, ky, kx, pix, npix), db_dy1(dyplane, ky, kx, pix + 1u, npix),
                                      db_dy1(dyplane, ky, kx, pix + 2u, npix), db_dy1(dyplane, ky, kx, pix + 3u, npix));
                } else {
                    px[q] = vec4<f32>(0.0);
                }
            }
        }
        db_advance(&acc, pw, px, c, chunks, li, tm, tn);
    }
    for (var i = 0u; i < 8u; i++) {
        let ci = ci0 + tm + i;
        if (ci >= p.cin) {
            break;
        }
        for (var j = 0u; j < 8u; j++) {
            let pix = px0 + tn + j;
            if (pix < npix) {
                dx[(n * p.cin + ci) * npix + pix] = acc[i * 2u + j / 4u][j % 4u];
            }
        }
    }
}

@group(0) @binding(2) var<storage, read> x_saved: array<u32>;

fn x_saved_at(i: u32) -> f32 {
    if (p.x_spikes != 0u) {
        return f32((x_saved[i / 32u] >> (i % 32u)) & 1u);
    }
    return bitcast<f32>(x_saved[i]);
}
@group(0) @binding(3) var<storage, read_write> dw_partial: array<f32>;

// Elements of the flattened (n, oy, ox) space one invocation sums (see the header).
// Filled from Rust (src/ops/conv.rs GRAD_W_CHUNK, which also sizes the partials); no default, so
// a pipeline without it fails to build instead of disagreeing with the Rust side.
override GRAD_W_CHUNK: u32;

@compute @workgroup_size(64)
fn conv2d_grad_weight(@builtin(global_invocation_id) gid: vec3<u32>) {
    let ci = gid.x;
    let co0 = gid.y * 4u;
    let part = gid.z;
    if (ci >= p.cin) {
        return;
    }
    // acc[tap] holds the 4 output channels co0..co0+3 of one (ci, ky, kx): each loaded input
    // value feeds 4 FMAs, each (workgroup-uniform, broadcast) dy load feeds up to 9.
    var acc: array<vec4<f32>, 9>;
    for (var j = 0u; j < 9u; j++) {
        acc[j] = vec4<f32>(0.0);
    }
    let plane = p.ho * p.wo;
    let total = p.n * plane;
    let end = min(total, (part + 1u) * GRAD_W_CHUNK);
    var co: vec4<u32>;
    for (var j = 0u; j < 4u; j++) {
        co[j] = min(co0 + j, p.cout - 1u);
    }
    for (var e = part * GRAD_W_CHUNK; e < end; e++) {
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
    let size = p.cout * p.cin * kk;
    for (var j = 0u; j < 4u; j++) {
        if (co0 + j >= p.cout) {
            break;
        }
        for (var tap = 0u; tap < kk; tap++) {
            dw_partial[part * size + ((co0 + j) * p.cin + ci) * kk + tap] = acc[tap][j];
        }
    }
}

@compute @workgroup_size(64)
fn conv2d_grad_weight_igemm(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let kk = p.k * p.k;
    let rdim = p.cin * kk;
    let plane = p.ho * p.wo;
    let end = min(p.n * plane, (wid.z + 1u) * GRAD_W_CHUNK);
    let co0 = wid.y * IG_TILE;
    let r0 = wid.x * IG_TILE;
    let tm = (li / 8u) * 4u;
    let tn = (li % 8u) * 4u;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var e0 = wid.z * GRAD_W_CHUNK; e0 < end; e0 += IG_TK) {
        for (var q = 0u; q < 4u; q++) {
            let idx = li * 4u + q;
            let e = e0 + idx / IG_TILE;
            let m = idx % IG_TILE;
            let n = e / plane;
            let pix = e % plane;
            var g = 0.0;
            if (e < end && co0 + m < p.cout) {
                g = dy[(n * p.cout + co0 + m) * plane + pix];
            }
            ig_w[idx] = g;
            var v = 0.0;
            let r = r0 + m;
            if (e < end && r < rdim) {
                let ci = r / kk;
                let ky = (r % kk) / p.k;
                let kx = r % p.k;
                let iy = i32((pix / p.wo) * p.stride + ky) - i32(p.pad);
                let ix = i32((pix % p.wo) * p.stride + kx) - i32(p.pad);
                if (iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {
                    v = x_saved_at(((n * p.cin + ci) * p.h + u32(iy)) * p.w + u32(ix));
                }
            }
            ig_x[idx] = v;
        }
        workgroupBarrier();
        for (var kr = 0u; kr < IG_TK; kr++) {
            let row = kr * IG_TILE;
            let xv = vec4<f32>(ig_x[row + tn], ig_x[row + tn + 1u], ig_x[row + tn + 2u], ig_x[row + tn + 3u]);
            acc0 += xv * ig_w[row + tm];
            acc1 += xv * ig_w[row + tm + 1u];
            acc2 += xv * ig_w[row + tm + 2u];
            acc3 += xv * ig_w[row + tm + 3u];
        }
        workgroupBarrier();
    }
    let size = p.cout * rdim;
    let accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let co = co0 + tm + i;
        if (co >= p.cout) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let r = r0 + tn + j;
            if (r < rdim) {
                dw_partial[wid.z * size + co * rdim + r] = accs[i][j];
            }
        }
    }
}

// dw[i] = sum over parts, in order, of dw_partial[part, i]; p.n holds the number of parts here.
@group(0) @binding(1) var<storage, read> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> dw: array<f32>;

@compute @workgroup_size(256)
fn conv2d_grad_weight_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    let size = p.cout * p.cin * p.k * p.k;
    if (i >= size) {
        return;
    }
    var acc = 0.0;
    for (var part = 0u; part < p.n; part++) {
        acc += partials[part * size + i];
    }
    dw[i] = acc;
}
