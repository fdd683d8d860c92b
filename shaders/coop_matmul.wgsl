// coop_matmul.wgsl: C[M, N] = A[M, K] . B[K, N] (+ bias[N]) on cooperative matrices (tensor cores),
// the math, parameters and bindings of matmul.wgsl (A and B read through strides), so its
// variants are candidates of the same node as matmul's f32 kernels:
//
//   C[m, n] = bias[n] + sum_k A[m*a_sm + k*a_sk] * B[k*b_sk + n*b_sn]      (bias last)
//
// The product is common/coop_fragment.wgsl's (prepended with an instance prelude: fragment side
// F, tile, workgroup size), f16 fragments into f32 accumulators, each operand exact, split into
// hi + lo, or (mode CM_SCALED) split after a power-of-two pre-scale of its block: A's rows
// [m0, m0 + CM_BM) over all K, or B's columns [n0, n0 + CM_BN), scaled so their largest magnitude
// lies in [2^14, 2^15) (cm_prescale_exponent); the result is scaled back exactly in f32. The sum
// is in f32 but in the order of the fragments (chunks of F steps, hi and lo separate), so it
// matches the f32 kernels to f32 rounding, not bit for bit.
//
// A workgroup owns a CM_BM x CM_BN tile of C and walks K in chunks of CM_BK, staging both
// operands' chunks through workgroup memory (zeros past the edges); the epilogue reads the
// result tile back from workgroup memory, so the global stores are row-contiguous.
// Grid: x = ceil(N / CM_BN), y = ceil(M / CM_BM).

struct Params {
    m: u32, n: u32, k: u32, has_bias: u32,
    a_sm: u32, a_sk: u32, b_sk: u32, b_sn: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

/// Operand mode (besides the fragment's CM_EXACT and CM_SPLIT): split after the block pre-scale.
const CM_SCALED: u32 = 2u;

var<workgroup> block_max: array<f32, CM_WG>;

/// The largest |value| among those each invocation passes, for every invocation (a fixed tree;
/// max is exact, so the order does not matter). Call from uniform control flow.
fn workgroup_max(li: u32, v: f32) -> f32 {
    block_max[li] = v;
    workgroupBarrier();
    for (var s = CM_WG / 2u; s > 0u; s = s / 2u) {
        if (li < s) {
            block_max[li] = max(block_max[li], block_max[li + s]);
        }
        workgroupBarrier();
    }
    let m = block_max[0];
    workgroupBarrier();
    return m;
}

fn a_at(m: u32, k: u32) -> f32 {
    if (m < p.m && k < p.k) {
        return a[m * p.a_sm + k * p.a_sk];
    }
    return 0.0;
}

fn b_at(k: u32, n: u32) -> f32 {
    if (k < p.k && n < p.n) {
        return b[k * p.b_sk + n * p.b_sn];
    }
    return 0.0;
}

@compute @workgroup_size(CM_WG)
fn coop_matmul(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) nsg: u32,
) {
    let m0 = wid.y * CM_BM;
    let n0 = wid.x * CM_BN;

    var pa = 0;
    if (CM_A_MODE == CM_SCALED) {
        var v = 0.0;
        for (var e = li; e < CM_BM * p.k; e += CM_WG) {
            v = max(v, abs(a_at(m0 + e / p.k, e % p.k)));
        }
        pa = cm_prescale_exponent(workgroup_max(li, v));
    }
    var pb = 0;
    if (CM_B_MODE == CM_SCALED) {
        var v = 0.0;
        for (var e = li; e < p.k * CM_BN; e += CM_WG) {
            v = max(v, abs(b_at(e / CM_BN, n0 + e % CM_BN)));
        }
        pb = cm_prescale_exponent(workgroup_max(li, v));
    }
    let sa = ldexp(1.0, -pa);
    let sb = ldexp(1.0, -pb);

    cm_begin();
    for (var k0 = 0u; k0 < p.k; k0 += CM_BK) {
        for (var e = li; e < CM_BM * CM_BK; e += CM_WG) {
            cm_stage_a(e, a_at(m0 + e / CM_BK, k0 + e % CM_BK) * sa);
        }
        for (var e = li; e < CM_BK * CM_BN; e += CM_WG) {
            cm_stage_b(e, b_at(k0 + e / CM_BN, n0 + e % CM_BN) * sb);
        }
        workgroupBarrier();
        cm_mma(sg, nsg);
        workgroupBarrier();
    }
    cm_finish(sg, nsg);
    workgroupBarrier();

    for (var e = li; e < CM_BM * CM_BN; e += CM_WG) {
        let m = m0 + e / CM_BN;
        let n = n0 + e % CM_BN;
        if (m < p.m && n < p.n) {
            var v = ldexp(cm_c[e], pa + pb);
            if (p.has_bias != 0u) {
                v = v + bias[n];
            }
            c[m * p.n + n] = v;
        }
    }
}
