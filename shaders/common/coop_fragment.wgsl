// common/coop_fragment.wgsl: the inner product of a workgroup-tiled GEMM on cooperative matrices
// (tensor cores), f16 fragments into f32 accumulators, with real-valued operands carried as two
// f16 parts so that the product keeps f32's accuracy. Prepended (after an instance prelude) to
// the shaders whose GEMM it computes: shaders/coop_matmul.wgsl now, the conv passes next.
//
// Instance prelude (src/ops/coop_matmul.rs coop_shader!, one source for every shape): the
// `enable f16;` and `enable wgpu_cooperative_matrix;` directives, the fragment types CmA, CmB
// (coop_matFxF<f16, A|B>) and CmC (coop_matFxF<f32, C>), and the consts CM_F (fragment side F),
// CM_BM x CM_BN (the workgroup's output tile), CM_BK (reduction steps staged per chunk, a
// multiple of F), CM_WG (invocations) and CM_MAXF (fragments one subgroup may own).
//
// Numerics. Each operand enters as override CM_A_MODE / CM_B_MODE says:
//   CM_EXACT (0): the value is exact in f16 (spikes, 0 or 1): one part, hi = f16(x).
//   CM_SPLIT (1): hi = x rounded to f16, lo = f16((x - hi) * 2^11) (x - hi is exact in f32).
//       hi carries f16's 11 bits, lo the next 11 (scaled by 2^11 so that it stays a normal f16),
//       so hi + lo * 2^-11 is x to about 2^-22 relative, a few f32 ulps, for |x| in f16's normal
//       range [2^-14, 2^15). Below it the error is at most 2^-36 absolute (lo's own subnormal
//       step), too much for the presets' gradients (max |dy| per conv 2^-23 .. 2^-2, most values
//       far smaller), a zero-initialised layer's weights (2^-20) or its successor's input
//       (README, "Cooperative matrices"), so loaders pre-scale real operands by a power of two
//       first (coop_matmul.wgsl: CM_SCALED; see cm_prescale_exponent).
// The products: f16 x f16 products are exact in f32, the accumulators are f32.
//   cm_hi += a_hi * b_hi
//   cm_lo += a_lo * b_hi  (if A is split)  +  a_hi * b_lo  (if B is split)
//   result = cm_hi + cm_lo * 2^-11
// so an exact operand costs one product per fragment pair, one split operand two, two split
// operands three (the lo * lo term is below f32's rounding and left out).
//
// Protocol (every call from uniform control flow of the whole workgroup):
//   cm_begin()                    zero the accumulators
//   per chunk of CM_BK reduction steps:
//     cm_stage_a(r * CM_BK + k, x) for every element of the chunk's A tile [CM_BM][CM_BK],
//     cm_stage_b(k * CM_BN + c, x) for every element of its B tile [CM_BK][CM_BN]
//                                 (zeros past the matrix edges), then workgroupBarrier();
//     cm_mma(sg, nsg)             the fragment products of the chunk, then workgroupBarrier();
//   cm_finish(sg, nsg); workgroupBarrier();   the result tile, row-major, in cm_c[r * CM_BN + c]
// sg and nsg are @builtin(subgroup_id) and @builtin(num_subgroups): subgroup sg owns the
// fragments sg, sg + nsg, ... of the tile, in CM_MAXF slots (see cm_fragment), so the instance
// is correct for subgroups of CM_WG / CM_NFRAG to CM_WG * CM_MAXF / CM_NFRAG invocations (the
// variant's Needs::subgroups). Layout: coopLoadT / coopStoreT read and write row-major data
// (plain coopLoad would take the transpose).

const CM_EXACT: u32 = 0u;
const CM_SPLIT: u32 = 1u;
/// 2^11: lo parts are stored this much larger.
const CM_LO_SCALE: f32 = 2048.0;
/// Fragments of the workgroup tile.
const CM_NFRAG: u32 = (CM_BM / CM_F) * (CM_BN / CM_F);

override CM_A_MODE: u32 = 1u;
override CM_B_MODE: u32 = 1u;

var<workgroup> cm_a_hi: array<f16, CM_BM * CM_BK>;
var<workgroup> cm_a_lo: array<f16, CM_BM * CM_BK>;
var<workgroup> cm_b_hi: array<f16, CM_BK * CM_BN>;
var<workgroup> cm_b_lo: array<f16, CM_BK * CM_BN>;
var<workgroup> cm_c: array<f32, CM_BM * CM_BN>;

var<private> cm_hi: array<CmC, CM_MAXF>;
var<private> cm_lo: array<CmC, CM_MAXF>;

fn cm_begin() {
    for (var j = 0u; j < CM_MAXF; j++) {
        cm_hi[j] = CmC();
        cm_lo[j] = CmC();
    }
}

/// x rounded to the nearest f16 (ties to even), still as an f32: what f16(x) holds, for |x| below
/// f16's largest value. Computed without f16 conversions: compilers may fold f32(f16(x)) into x
/// (lavapipe does), which would make every lo part zero. Normal range: 11 significant bits, on
/// the bits; below 2^-14 (f16 subnormals): the multiples of 2^-24 (exact f32 steps).
fn cm_round_f16(x: f32) -> f32 {
    if (abs(x) < 6.103515625e-5) {
        return round(x * 16777216.0) * 5.9604644775390625e-8;
    }
    let bits = bitcast<u32>(x);
    return bitcast<f32>((bits + 0x0fffu + ((bits >> 13u) & 1u)) & 0xffffe000u);
}

fn cm_stage_a(i: u32, x: f32) {
    if (CM_A_MODE == CM_EXACT) {
        cm_a_hi[i] = f16(x);
    } else {
        let hi = cm_round_f16(x);
        cm_a_hi[i] = f16(hi);
        cm_a_lo[i] = f16((x - hi) * CM_LO_SCALE);
    }
}

fn cm_stage_b(i: u32, x: f32) {
    if (CM_B_MODE == CM_EXACT) {
        cm_b_hi[i] = f16(x);
    } else {
        let hi = cm_round_f16(x);
        cm_b_hi[i] = f16(hi);
        cm_b_lo[i] = f16((x - hi) * CM_LO_SCALE);
    }
}

/// The fragment of slot j of subgroup sg (of nsg): sg + j * nsg, or, for a slot past the tile,
/// the subgroup's own first fragment again (computed and stored twice by the same subgroup, so
/// no two subgroups ever write one fragment). Control flow must not depend on it: cooperative
/// operations need workgroup-uniform control flow (naga checks it), so the slots are a fixed
/// count and only the data they address differs. Needs nsg <= CM_NFRAG <= nsg * CM_MAXF.
fn cm_fragment(sg: u32, nsg: u32, j: u32) -> u32 {
    let f = sg + j * nsg;
    return select(sg, f, f < CM_NFRAG);
}

fn cm_mma(sg: u32, nsg: u32) {
    for (var j = 0u; j < CM_MAXF; j++) {
        let f = cm_fragment(sg, nsg, j);
        let a_at = (f / (CM_BN / CM_F)) * CM_F * CM_BK;
        let b_at = (f % (CM_BN / CM_F)) * CM_F;
        for (var k = 0u; k < CM_BK; k += CM_F) {
            let a_hi = coopLoadT<CmA>(&cm_a_hi[a_at + k], CM_BK);
            let b_hi = coopLoadT<CmB>(&cm_b_hi[b_at + k * CM_BN], CM_BN);
            cm_hi[j] = coopMultiplyAdd(a_hi, b_hi, cm_hi[j]);
            if (CM_A_MODE != CM_EXACT) {
                let a_lo = coopLoadT<CmA>(&cm_a_lo[a_at + k], CM_BK);
                cm_lo[j] = coopMultiplyAdd(a_lo, b_hi, cm_lo[j]);
            }
            if (CM_B_MODE != CM_EXACT) {
                let b_lo = coopLoadT<CmB>(&cm_b_lo[b_at + k * CM_BN], CM_BN);
                cm_lo[j] = coopMultiplyAdd(a_hi, b_lo, cm_lo[j]);
            }
        }
    }
}

fn cm_finish(sg: u32, nsg: u32) {
    for (var j = 0u; j < CM_MAXF; j++) {
        let f = cm_fragment(sg, nsg, j);
        let at = (f / (CM_BN / CM_F)) * CM_F * CM_BN + (f % (CM_BN / CM_F)) * CM_F;
        coopStoreT(cm_hi[j] + cm_lo[j] * (1.0 / CM_LO_SCALE), &cm_c[at], CM_BN);
    }
}

/// The pre-scale exponent p of a block whose largest magnitude is `max_abs`: x * 2^-p has its
/// largest value in [2^14, 2^15), inside f16's range with its smallest normal 2^-28 below that
/// (smaller values add less than f32's rounding to the sum). 0 for an all-zero or non-finite
/// block (NaN and infinity then propagate as in f32); clamped to [-60, 60] so that 2^-p and the
/// product's 2^(pa + pb) stay f32 numbers.
fn cm_prescale_exponent(max_abs: f32) -> i32 {
    if (!(max_abs > 0.0) || max_abs > 3.0e38) {
        return 0;
    }
    // frexp: max_abs = fract * 2^exp with fract in [0.5, 1), so floor(log2(max_abs)) = exp - 1.
    return clamp(frexp(max_abs).exp - 1 - 14, -60, 60);
}
