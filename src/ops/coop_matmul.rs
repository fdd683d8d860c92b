//! Matrix products on cooperative matrices (tensor cores): [`matmul`] is the node of
//! [`super::matmul::matmul`] (same math, parameters and bindings) with cooperative-matrix variants
//! among its candidates, one per fragment shape of [`INSTANCES`], each offered where the adapter
//! lists that shape and used only after it passed [`self_check`] on the adapter.
//!
//! The fragment (shaders/common/coop_fragment.wgsl) is written once; [`coop_shader!`] builds a
//! module from it for one shape by prepending an instance prelude (the f16 / f32 fragment types
//! and the tile consts). How each operand enters the product is an [`Operand`] mode.
//!
//! The kernels and their self-check: docs/kernels.md (Cooperative matrices); their f16
//! numerics and measured error: docs/numerics.md (Cooperative matrices).

use anyhow::Result;

use crate::gpu::{Context, Shader, COOP_FEATURES};
use crate::graph::{Cost, Graph, Needs, Node, Params, TensorId, TileWork, Variant};
use crate::ops::matmul::{self, MatmulParams, Strides};

/// One cooperative-matrix instance: fragment side and workgroup tile (the prelude's consts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instance {
    /// Variant name, e.g. "coop8".
    pub name: &'static str,
    /// Fragment side F of the F x F x F f16 x f16 -> f32 configuration (`Needs::coop`).
    pub f: u32,
    /// Output tile rows and columns of one workgroup, reduction steps per staged chunk.
    pub bm: u32,
    pub bn: u32,
    pub bk: u32,
    /// Invocations per workgroup.
    pub wg: u32,
    /// Fragment slots of one subgroup: with (bm / f) * (bn / f) fragments per tile, the instance
    /// serves subgroups of [`Instance::subgroups`] invocations.
    pub maxf: u32,
}

impl Instance {
    /// Fragments of the workgroup tile.
    pub fn fragments(&self) -> u32 {
        (self.bm / self.f) * (self.bn / self.f)
    }

    /// Subgroup widths the instance is correct for (shaders/common/coop_fragment.wgsl
    /// cm_fragment): at most one subgroup per fragment, enough slots for all of them.
    pub fn subgroups(&self) -> (u32, u32) {
        (self.wg / self.fragments(), self.wg * self.maxf / self.fragments())
    }

    /// Workgroup memory of the fragment: hi and lo of both staged operands (f16), the f32 result
    /// tile, and the body's wg-word reduction array.
    pub fn workgroup_bytes(&self) -> u32 {
        2 * 2 * (self.bm * self.bk + self.bk * self.bn) + 4 * self.bm * self.bn + 4 * self.wg
    }
}

/// The instances: 8x8x8 for subgroups of 8 (lavapipe 26) and of up to 32 (Apple's simdgroups),
/// 16x16x16 for subgroups of up to 32 (NVIDIA, AMD in wave32) and of up to 64 (AMD in wave64).
/// [`SHADERS`] holds their modules in the same order (tests/coop.rs checks the preludes agree).
pub const INSTANCES: [Instance; 4] = [
    Instance { name: "coop8", f: 8, bm: 32, bn: 32, bk: 16, wg: 64, maxf: 2 },
    Instance { name: "coop8w32", f: 8, bm: 32, bn: 32, bk: 16, wg: 128, maxf: 4 },
    Instance { name: "coop16", f: 16, bm: 64, bn: 64, bk: 16, wg: 128, maxf: 4 },
    Instance { name: "coop16w64", f: 16, bm: 64, bn: 64, bk: 16, wg: 256, maxf: 4 },
];

/// A cooperative-matrix module: the instance prelude (enables, fragment types, tile consts), then
/// shaders/common/coop_fragment.wgsl, then shaders/NAME.wgsl. The module is trusted like the other
/// GEMM kernels: every global index is guarded by the sizes in its parameters.
#[macro_export]
macro_rules! coop_shader {
    ($name:literal, f: $f:literal, bm: $bm:literal, bn: $bn:literal, bk: $bk:literal, wg: $wg:literal, maxf: $maxf:literal) => {
        $crate::gpu::Shader {
            name: $name,
            source: concat!(
                "enable f16;\nenable wgpu_cooperative_matrix;\n",
                "// instance prelude (src/ops/coop_matmul.rs INSTANCES)\n",
                "alias CmA = coop_mat",
                $f,
                "x",
                $f,
                "<f16, A>;\n",
                "alias CmB = coop_mat",
                $f,
                "x",
                $f,
                "<f16, B>;\n",
                "alias CmC = coop_mat",
                $f,
                "x",
                $f,
                "<f32, C>;\n",
                "const CM_F: u32 = ",
                $f,
                "u;\n",
                "const CM_BM: u32 = ",
                $bm,
                "u;\n",
                "const CM_BN: u32 = ",
                $bn,
                "u;\n",
                "const CM_BK: u32 = ",
                $bk,
                "u;\n",
                "const CM_WG: u32 = ",
                $wg,
                "u;\n",
                "const CM_MAXF: u32 = ",
                $maxf,
                "u;\n",
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/common/coop_fragment.wgsl")),
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/", $name, ".wgsl"))
            ),
            trusted: true,
        }
    };
}

/// shaders/coop_matmul.wgsl for each of [`INSTANCES`], in that order.
pub static SHADERS: [Shader; 4] = [
    coop_shader!("coop_matmul", f: 8, bm: 32, bn: 32, bk: 16, wg: 64, maxf: 2),
    coop_shader!("coop_matmul", f: 8, bm: 32, bn: 32, bk: 16, wg: 128, maxf: 4),
    coop_shader!("coop_matmul", f: 16, bm: 64, bn: 64, bk: 16, wg: 128, maxf: 4),
    coop_shader!("coop_matmul", f: 16, bm: 64, bn: 64, bk: 16, wg: 256, maxf: 4),
];

/// How an operand enters the cooperative-matrix product (the WGSL CM_*_MODE constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// Exact in f16 (spikes: 0 or 1): one f16 part.
    Exact,
    /// hi + lo f16 parts as they are: for values known to lie in f16's normal range
    /// [2^-14, 2^15) (entries below it are kept to 2^-36 absolute only).
    Split,
    /// hi + lo after a power-of-two pre-scale of each workgroup's block: any real operand (the
    /// presets' gradients, and some of their weights and activations, sit below 2^-14).
    Scaled,
}

impl Operand {
    fn mode(self) -> f64 {
        match self {
            Operand::Exact => 0.0,
            Operand::Split => 1.0,
            Operand::Scaled => 2.0,
        }
    }
}

/// The cooperative-matrix variants of an [M, N] product whose operands enter as `operands`.
pub fn variants(m: usize, n: usize, operands: [Operand; 2]) -> Vec<Variant> {
    INSTANCES.iter().zip(&SHADERS).map(|(inst, shader)| variant(inst, shader, m, n, operands)).collect()
}

/// The variant of `inst` running `shader` (a module built for `inst`).
pub fn variant(inst: &Instance, shader: &'static Shader, m: usize, n: usize, [a, b]: [Operand; 2]) -> Variant {
    let workgroups = [n.div_ceil(inst.bn as usize) as u32, m.div_ceil(inst.bm as usize) as u32, 1];
    Variant {
        name: inst.name.into(),
        entry: "coop_matmul",
        constants: vec![("CM_A_MODE", a.mode()), ("CM_B_MODE", b.mode())],
        workgroups,
        // Every staged element is written before the barrier that precedes its reads, the result
        // tile by cm_finish before the epilogue's, the reduction array before its tree.
        writes_workgroup_memory_first: true,
        shader: Some(shader),
        needs: Needs {
            features: COOP_FEATURES,
            workgroup_bytes: inst.workgroup_bytes(),
            invocations: inst.wg,
            coop: inst.f,
            subgroups: Some(inst.subgroups()),
            check: Some(crate::graph::SelfCheck(self_check)),
        },
        tile: Some(TileWork::of_grid(m * n, workgroups, (inst.bm * inst.bn) as usize)),
    }
}

/// C[M, N] = A . B (+ bias[N]) as [`matmul::matmul`], with the cooperative-matrix variants
/// ([`variants`]) among the candidates after matmul's own f32 ones (the default stays matmul's).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    g: &mut Graph,
    a: TensorId,
    b: TensorId,
    bias: Option<TensorId>,
    [m, n, k]: [usize; 3],
    strides: Strides,
    operands: [Operand; 2],
    name: &str,
) -> TensorId {
    assert_eq!(g.info(a).numel(), m * k, "{name}: A must hold M*K = {} values", m * k);
    assert_eq!(g.info(b).numel(), k * n, "{name}: B must hold K*N = {} values", k * n);
    if let Some(bias) = bias {
        assert_eq!(g.info(bias).numel(), n, "{name}: bias must hold N = {n} values");
    }
    let c = g.intermediate(name, &[m, n]);
    let u = |v: usize| u32::try_from(v).expect("matmul parameter exceeds u32");
    let p = MatmulParams {
        m: u(m),
        n: u(n),
        k: u(k),
        has_bias: bias.is_some() as u32,
        a_sm: u(strides.a_m),
        a_sk: u(strides.a_k),
        b_sk: u(strides.b_k),
        b_sn: u(strides.b_n),
    };
    let mut candidates: Vec<Variant> =
        matmul::variants(m, n).into_iter().map(|v| Variant { shader: Some(&matmul::SHADER), ..v }).collect();
    candidates.extend(variants(m, n, operands));
    g.push_variants(
        Node {
            // The family's own module, so its tuning keys are not matmul's (other candidates).
            shader: &SHADERS[0],
            entry: candidates[0].entry,
            params: Params::of(&p),
            reads: vec![a, b, bias.unwrap_or(b)],
            writes: vec![c],
            workgroups: candidates[0].workgroups,
            label: name.to_string(),
            cost: Cost { flops: 2 * (m * n * k) as u64, bytes: 4 * (m * k + k * n + m * n) as u64 },
        },
        candidates,
    );
    c
}

/// The self-check of a cooperative-matrix matmul variant ([`crate::graph::SelfCheck`]): the
/// variant against matmul's f32 default on a small odd-sized problem with both operands in
/// the variant's modes (spikes for exact ones, values spread over several binades for the
/// others), relative L2 error against at most [`CHECK_TOLERANCE`].
pub fn self_check(ctx: &Context, v: &Variant) -> Result<crate::graph::CheckOutcome> {
    let [m, n, k] = [45usize, 37, 83];
    let modes: Vec<f64> = ["CM_A_MODE", "CM_B_MODE"]
        .iter()
        .map(|c| v.constants.iter().find(|(n, _)| n == c).map_or(1.0, |x| x.1))
        .collect();
    let data = |len: usize, mode: f64, salt: u32| -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2654435761) ^ salt.wrapping_mul(0x9e3779b9);
                let h = h ^ (h >> 15);
                if mode == 0.0 {
                    (h & 1) as f32
                } else {
                    // Signed values over 2^-6 .. 2^2, times 2^-20 when pre-scaled (gradients).
                    let v = ((h >> 8) % 1000) as f32 / 1000.0 - 0.5;
                    let e = ((h >> 1) % 9) as i32 - 6;
                    v * 2f32.powi(e) * if mode == 2.0 { 2f32.powi(-20) } else { 1.0 }
                }
            })
            .collect()
    };
    let (ad, bd) = (data(m * k, modes[0], 1), data(k * n, modes[1], 2));
    let mut outs = Vec::new();
    for coop in [false, true] {
        let mut g = Graph::new();
        let a = g.input("a", &[m, k]);
        let b = g.input("b", &[k, n]);
        let c = matmul(&mut g, a, b, None, [m, n, k], Strides::nn(k, n), [Operand::Split; 2], "self-check");
        if coop {
            let inst = INSTANCES
                .iter()
                .find(|i| i.f == v.needs.coop && Some(i.subgroups()) == v.needs.subgroups)
                .expect("a cooperative-matrix variant of an instance");
            let t = g.variants.get_mut(&0).expect("the matmul node");
            t.candidates[1] = Variant {
                workgroups: [n.div_ceil(inst.bn as usize) as u32, m.div_ceil(inst.bm as usize) as u32, 1],
                ..v.clone()
            };
            g.choose(0, 1);
        }
        g.mark_output(c);
        let plan = crate::graph::Plan::compile(ctx, &g)?;
        plan.write(ctx, a, &ad)?;
        plan.write(ctx, b, &bd)?;
        plan.run(ctx)?;
        outs.push(plan.read(ctx, c)?);
    }
    let num: f64 = outs[0].iter().zip(&outs[1]).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = outs[0].iter().map(|&x| (x as f64).powi(2)).sum();
    Ok(crate::graph::CheckOutcome { error: (num / den.max(1e-300)).sqrt(), limit: CHECK_TOLERANCE })
}

/// Largest relative L2 error [`self_check`] accepts: hi + lo carries about 22 bits, so a good
/// kernel lands near 1e-7; a wrong layout, a dropped product or a zero result is 1e-3 or worse.
pub const CHECK_TOLERANCE: f64 = 1e-5;

/// CPU reference of [`matmul`]: [`matmul::matmul_cpu`] (the variants sum in another order, so
/// they match it to f32 rounding).
pub use crate::ops::matmul::matmul_cpu;
