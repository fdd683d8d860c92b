//! A GPU model for the dry run: where a step's time would go on a real card, without one.
//!
//! Every number this module prints is an ESTIMATE from napkin math, not a measurement. Per
//! dispatch it takes the graph's cost model (useful FLOPs, least bytes moved), the launch shape
//! (workgroups; invocations and workgroup memory reflected from the WGSL with naga), the tile
//! work a tiled variant declares ([`TileWork`]) and a table of cards ([`GPUS`]), and predicts
//!
//! ```text
//! t = launch + max(flops / utilisation / (peak * efficiency), bytes / (bandwidth * BW_EFFICIENCY)) / fill
//! fill = workgroups / (waves * slots),  slots = SMs * resident workgroups per SM,
//! waves = ceil(workgroups / slots)
//! ```
//!
//! `efficiency` is per kernel kind ([`kind_of`]; the share of peak a kernel of that shape reaches
//! when the card is full), resident workgroups per SM come from the occupancy limits (threads,
//! workgroups, workgroup memory and registers per SM at the kind's assumed registers per
//! invocation), and `fill` charges both partial waves and a grid too small for the card: by
//! Little's law a card with few workgroups in flight has few loads in flight, so bandwidth
//! scales with fill as compute does. The first GPU session calibrates the efficiencies and the
//! launch cost (tools/gpu_check.sh prints this model beside the measured times).
//!
//! A node with candidate kernels ([`crate::graph::Tunable`]) runs the candidate the model
//! predicts fastest on the card ([`choose`]), as the tuner would pick by measurement.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::gpu::Shader;
use crate::graph::{Graph, Node, Variant};
use crate::profile::layer_of;

/// One card of the model's table. Sources are cited per entry in [`GPUS`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuSpec {
    /// The `--gpu-model` name.
    pub name: &'static str,
    pub full_name: &'static str,
    /// Streaming multiprocessors (NVIDIA) or GPU cores (Apple).
    pub sms: u32,
    /// Peak fp32 FMA rate (non-tensor), TFLOP/s.
    pub fp32_tflops: f64,
    /// Peak dense f16-input tensor rate with f32 accumulation, TFLOP/s (no sparsity).
    pub f16_tensor_tflops: f64,
    /// Peak DRAM bandwidth, GB/s.
    pub bandwidth_gbs: f64,
    /// Workgroup (shared) memory one SM holds for all its resident workgroups, bytes.
    pub workgroup_memory_per_sm: u32,
    /// Workgroup memory one workgroup may use through Vulkan/Metal (the API's limit, which is
    /// below the CUDA opt-in maximum on NVIDIA), bytes.
    pub workgroup_memory_per_workgroup: u32,
    pub max_threads_per_sm: u32,
    pub max_workgroups_per_sm: u32,
    /// 32-bit registers per SM.
    pub registers_per_sm: u32,
    /// SIMD width (warp / simdgroup): invocations are allocated in whole SIMD groups.
    pub simd_width: u32,
    /// Subgroup operations through wgpu (Features::SUBGROUP).
    pub subgroups: bool,
    /// Cooperative-matrix sides F (F x F x F, f16 inputs, f32 accumulation) the driver lists.
    pub coop_sizes: &'static [u32],
    /// Fixed cost of one dispatch, microseconds (ASSUMED, to be calibrated): a compute dispatch
    /// in one command buffer plus the pipeline barrier between dependent dispatches (drain and
    /// refill of the card) costs a few microseconds on current drivers.
    pub launch_us: f64,
}

/// The cards the model knows (`--gpu-model NAME`).
pub const GPUS: [GpuSpec; 5] = [
    // NVIDIA H100 SXM5 80 GB. NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022) and
    // datasheet: 132 SMs, 66.9 TFLOP/s fp32, 989.4 TFLOP/s dense FP16 tensor (1979 with
    // sparsity), 3.35 TB/s HBM3, shared memory configurable up to 228 KB per SM, 256 KB register
    // file per SM (64K 32-bit registers). CUDA C++ Programming Guide, compute capability 9.0:
    // 2048 threads and 32 blocks per SM. Vulkan: maxComputeSharedMemorySize 49152 on NVIDIA's
    // driver (vulkan.gpuinfo.org), so a WGSL workgroup gets 48 KiB.
    GpuSpec {
        name: "h100",
        full_name: "NVIDIA H100 SXM5 80GB",
        sms: 132,
        fp32_tflops: 66.9,
        f16_tensor_tflops: 989.4,
        bandwidth_gbs: 3350.0,
        workgroup_memory_per_sm: 228 * 1024,
        workgroup_memory_per_workgroup: 48 * 1024,
        max_threads_per_sm: 2048,
        max_workgroups_per_sm: 32,
        registers_per_sm: 65536,
        simd_width: 32,
        subgroups: true,
        coop_sizes: &[16],
        launch_us: 3.0,
    },
    // NVIDIA H200 SXM 141 GB: the H100's GH100 at the same clocks (NVIDIA H200 datasheet: the
    // same 67 TFLOP/s fp32 and 989 TFLOP/s dense FP16 tensor) with 4.8 TB/s HBM3e; the borrowed
    // GPU machines are H100s or H200s (shared/notes/gpu-machine.md), so calibration runs there.
    GpuSpec {
        name: "h200",
        full_name: "NVIDIA H200 SXM 141GB",
        sms: 132,
        fp32_tflops: 66.9,
        f16_tensor_tflops: 989.4,
        bandwidth_gbs: 4800.0,
        workgroup_memory_per_sm: 228 * 1024,
        workgroup_memory_per_workgroup: 48 * 1024,
        max_threads_per_sm: 2048,
        max_workgroups_per_sm: 32,
        registers_per_sm: 65536,
        simd_width: 32,
        subgroups: true,
        coop_sizes: &[16],
        launch_us: 3.0,
    },
    // NVIDIA A100 SXM4 80 GB. NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020) and
    // the A100 datasheet: 108 SMs, 19.5 TFLOP/s fp32, 312 TFLOP/s dense FP16 tensor, 2039 GB/s
    // HBM2e (80 GB SXM), 164 KB shared memory per SM, 256 KB registers per SM. CUDA guide,
    // compute capability 8.0: 2048 threads, 32 blocks per SM. Vulkan: 48 KiB per workgroup.
    GpuSpec {
        name: "a100",
        full_name: "NVIDIA A100 SXM4 80GB",
        sms: 108,
        fp32_tflops: 19.5,
        f16_tensor_tflops: 312.0,
        bandwidth_gbs: 2039.0,
        workgroup_memory_per_sm: 164 * 1024,
        workgroup_memory_per_workgroup: 48 * 1024,
        max_threads_per_sm: 2048,
        max_workgroups_per_sm: 32,
        registers_per_sm: 65536,
        simd_width: 32,
        subgroups: true,
        coop_sizes: &[16],
        launch_us: 3.0,
    },
    // NVIDIA GeForce RTX 4090. NVIDIA Ada GPU Architecture whitepaper (2022), appendix table:
    // 128 SMs, 82.6 TFLOP/s fp32, 165.2 TFLOP/s dense FP16 tensor with FP32 accumulate (330.3
    // with FP16 accumulate), 1008 GB/s GDDR6X. CUDA guide, compute capability 8.9: 100 KB
    // shared memory per SM, 1536 threads and 24 blocks per SM, 64K registers per SM. Vulkan:
    // 48 KiB per workgroup.
    GpuSpec {
        name: "rtx4090",
        full_name: "NVIDIA GeForce RTX 4090",
        sms: 128,
        fp32_tflops: 82.6,
        f16_tensor_tflops: 165.2,
        bandwidth_gbs: 1008.0,
        workgroup_memory_per_sm: 100 * 1024,
        workgroup_memory_per_workgroup: 48 * 1024,
        max_threads_per_sm: 1536,
        max_workgroups_per_sm: 24,
        registers_per_sm: 65536,
        simd_width: 32,
        subgroups: true,
        coop_sizes: &[16],
        launch_us: 3.0,
    },
    // Apple M2, 10-core GPU. Apple's M2 announcement (June 2022): 10 GPU cores, 3.6 TFLOP/s,
    // 100 GB/s unified memory; philipturner/metal-benchmarks: 3579 GFLOP/s f32 and the same
    // f16 rate (no tensor cores: simdgroup_matrix runs on the f32 ALUs), 208 KB register file
    // per core. Metal Feature Set Tables: 32 KiB threadgroup memory per threadgroup, 1024
    // threads per threadgroup. Per-core residency is not published: ASSUMED 1024 threads,
    // 64 KiB threadgroup memory and 24 threadgroups per core. wgpu exposes no cooperative
    // matrices on Metal.
    GpuSpec {
        name: "m2",
        full_name: "Apple M2 (10-core GPU)",
        sms: 10,
        fp32_tflops: 3.58,
        f16_tensor_tflops: 3.58,
        bandwidth_gbs: 100.0,
        workgroup_memory_per_sm: 64 * 1024,
        workgroup_memory_per_workgroup: 32 * 1024,
        max_threads_per_sm: 1024,
        max_workgroups_per_sm: 24,
        registers_per_sm: 208 * 1024 / 4,
        simd_width: 32,
        subgroups: true,
        coop_sizes: &[],
        launch_us: 5.0,
    },
];

/// Share of peak DRAM bandwidth a streaming kernel sustains on a full card (ASSUMED: STREAM-like
/// copies reach 80-90% of the datasheet figure on HBM cards).
pub const BW_EFFICIENCY: f64 = 0.8;

/// The card named `name`, or a one-line error listing the known ones.
pub fn spec(name: &str) -> Result<&'static GpuSpec> {
    match GPUS.iter().find(|g| g.name == name) {
        Some(g) => Ok(g),
        None => {
            let known: Vec<&str> = GPUS.iter().map(|g| g.name).collect();
            bail!("unknown --gpu-model '{name}': the known models are {}", known.join(", "))
        }
    }
}

/// How a kernel of one shape uses the card: the share of the peak it reaches on a full card,
/// and the registers per invocation the occupancy limit assumes (ASSUMED, to be calibrated).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kind {
    pub name: &'static str,
    /// Share of the peak (fp32 FMA, or the f16 tensor peak when `tensor`) reached at full fill.
    pub efficiency: f64,
    pub registers: u32,
    pub tensor: bool,
}

/// The kind of a dispatch: by its variant where it has one (names of src/ops/conv.rs,
/// conv_subgroup.rs, matmul.rs, coop_matmul.rs), else a streaming kernel. The efficiencies
/// follow issue 16's reading of today's kernels; unknown variants fall back by shape.
pub fn kind_of(variant: Option<&Variant>) -> Kind {
    let k = |name, efficiency, registers| Kind { name, efficiency, registers, tensor: false };
    let Some(v) = variant else {
        // Elementwise, reductions, neurons, optimizer: bandwidth-bound, few FLOPs per byte.
        return k("streaming", 0.5, 32);
    };
    if v.needs.coop != 0 {
        // f16 hi/lo split of f32 operands: 3 tensor products per f32 product, at ~45% of the
        // tensor peak each (CUTLASS-class kernels reach 60-80%; a first WGSL port less).
        return Kind { name: "coop-matrix (f16 hi/lo, 3 MMA)", efficiency: 0.15, registers: 128, tensor: true };
    }
    let n = v.name.as_str();
    if n.starts_with("db") {
        // Double-buffered workgroup-tiled GEMM, 8x8 outputs per invocation: bank conflicts on
        // the vec4 workgroup reads and runtime index math in the loaders (issue 16) hold it
        // below llama.cpp's ~45% of fp32 peak.
        k("gemm db (workgroup-tiled, 8x8)", 0.35, 128)
    } else if n.starts_with("igemm") {
        // 32x32 tiles, 4 outputs per invocation, scalar workgroup reads, 4 div/mods per staged
        // element.
        k("gemm igemm32 (32x32, scalar smem)", 0.15, 64)
    } else if n == "r8x4" {
        // 8x4 register tile per invocation, operands through L1, no workgroup memory.
        k("register-tiled 8x4", 0.2, 64)
    } else if n == "r4xkk" || n == "sg4xkk" {
        // Per-lane input planes (uncoalesced), runtime-indexed accumulators in local memory, or
        // no tiling with dy re-read Cin times: issue 16 puts them at 5-8% of peak.
        k("weight-gradient direct", 0.06, 64)
    } else if n.starts_with("wg") {
        // matmul.wgsl: 4x4 register tile per invocation, operands through L1.
        k("matmul register-tiled 4x4", 0.25, 64)
    } else if v.tile.is_some() {
        k("tiled (unknown variant)", 0.2, 64)
    } else {
        k("streaming", 0.5, 32)
    }
}

/// Invocations per workgroup and workgroup bytes of an entry point, read from its module.
#[derive(Default)]
pub struct Reflector {
    modules: HashMap<usize, Option<(naga::Module, naga::valid::ModuleInfo)>>,
}

impl Reflector {
    pub fn new() -> Self {
        Self::default()
    }

    /// (invocations per workgroup, workgroup bytes) of `entry` in `shader` with the pipeline
    /// constants `constants` (None: the module or entry could not be read, or a size depends on
    /// an override that has no value).
    pub fn launch(&mut self, shader: &Shader, entry: &str, constants: &[(&str, f64)]) -> Option<(u32, u32)> {
        let parsed = self.modules.entry(shader.source.as_ptr() as usize).or_insert_with(|| {
            let module = naga::front::wgsl::parse_str(shader.source).ok()?;
            let info =
                naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
                    .validate(&module)
                    .ok()?;
            Some((module, info))
        });
        let (module, info) = parsed.as_ref()?;
        let (index, ep) = module.entry_points.iter().enumerate().find(|(_, e)| e.name == entry)?;
        let mut size = 1u32;
        for axis in 0..3 {
            let n = match ep.workgroup_size_overrides.as_ref().and_then(|o| o[axis]) {
                Some(expr) => eval(module, constants, expr)? as u32,
                None => ep.workgroup_size[axis],
            };
            size *= n.max(1);
        }
        let uses = info.get_entry_point(index);
        let mut bytes = 0u32;
        for (h, var) in module.global_variables.iter() {
            if var.space != naga::AddressSpace::WorkGroup || uses[h].is_empty() {
                continue;
            }
            bytes += match module.types[var.ty].inner {
                naga::TypeInner::Array { size: naga::ArraySize::Pending(o), stride, .. } => {
                    stride * eval(module, constants, module.overrides[o].init?)? as u32
                }
                ref inner => inner.try_size(module.to_ctx())?,
            };
        }
        Some((size, bytes))
    }
}

/// The value of a global (constant or override) expression: literals, constants, overrides
/// (from `constants` by name, else their default) and integer arithmetic on them.
fn eval(module: &naga::Module, constants: &[(&str, f64)], expr: naga::Handle<naga::Expression>) -> Option<f64> {
    use naga::{BinaryOperator as B, Expression as E, Literal as L};
    match module.global_expressions[expr] {
        E::Literal(l) => match l {
            L::U32(v) => Some(v as f64),
            L::I32(v) => Some(v as f64),
            L::AbstractInt(v) => Some(v as f64),
            L::F32(v) => Some(v as f64),
            L::AbstractFloat(v) => Some(v),
            _ => None,
        },
        E::Constant(c) => eval(module, constants, module.constants[c].init),
        E::Override(o) => {
            let ov = &module.overrides[o];
            let given = ov.name.as_deref().and_then(|n| constants.iter().find(|(k, _)| *k == n)).map(|&(_, v)| v);
            given.or_else(|| eval(module, constants, ov.init?))
        }
        E::Binary { op, left, right } => {
            let (a, b) = (eval(module, constants, left)?, eval(module, constants, right)?);
            match op {
                B::Add => Some(a + b),
                B::Subtract => Some(a - b),
                B::Multiply => Some(a * b),
                // Array sizes and workgroup sizes are integers: WGSL integer division truncates.
                B::Divide if b != 0.0 => Some((a / b).trunc()),
                B::Modulo if b != 0.0 => Some(a % b),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The model's prediction for one dispatch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DispatchEstimate {
    /// "shader::entry", as the measured profile names kernels.
    pub kernel: String,
    pub variant: Option<String>,
    pub layer: String,
    pub label: String,
    pub workgroups: u64,
    pub invocations: u32,
    pub workgroup_bytes: u32,
    /// Useful outputs / computed outputs (1.0 for kernels without tiles).
    pub tile_utilization: f64,
    pub flops: u64,
    pub bytes: u64,
    /// Workgroups / (waves * slots of the card).
    pub fill: f64,
    /// The kind whose efficiency the estimate used.
    pub kind: String,
    /// Estimated time (microseconds), launch included.
    pub est_us: f64,
    /// Every candidate of a node with several kernels, with its estimate (empty for a node with
    /// one kernel): tools compare a measured run's variants with the model's estimate of them.
    pub candidates: Vec<CandidateEstimate>,
}

/// The model's estimate of one candidate kernel of a tunable node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateEstimate {
    pub variant: String,
    /// "shader::entry" of the candidate.
    pub kernel: String,
    /// Whether the card can run it (features, workgroup memory); the model chooses among these.
    pub runs: bool,
    pub kind: String,
    pub tile_utilization: f64,
    pub est_us: f64,
}

impl DispatchEstimate {
    /// The measured profile's kernel key: "shader::entry@variant" (or "shader::entry").
    pub fn kernel_key(&self) -> String {
        self.variant.as_ref().map_or_else(|| self.kernel.clone(), |v| format!("{}@{v}", self.kernel))
    }
}

/// Resident workgroups per SM of a launch shape (at least 1: a shape that fits the API limits
/// runs, however poorly).
pub fn resident_per_sm(gpu: &GpuSpec, invocations: u32, workgroup_bytes: u32, registers: u32) -> u32 {
    let threads = invocations.max(1).div_ceil(gpu.simd_width) * gpu.simd_width;
    let by_threads = gpu.max_threads_per_sm / threads;
    let by_memory = gpu.workgroup_memory_per_sm.checked_div(workgroup_bytes).unwrap_or(u32::MAX);
    let by_registers = gpu.registers_per_sm / (threads * registers.max(1));
    gpu.max_workgroups_per_sm.min(by_threads).min(by_memory).min(by_registers).max(1)
}

/// Share of the card's workgroup slots a grid of `workgroups` keeps busy over its waves.
pub fn fill(gpu: &GpuSpec, workgroups: u64, resident: u32) -> f64 {
    let slots = (gpu.sms * resident) as u64;
    let waves = workgroups.max(1).div_ceil(slots);
    workgroups.max(1) as f64 / (waves * slots) as f64
}

/// Estimated microseconds of a dispatch: see the module comment.
pub fn time_us(gpu: &GpuSpec, kind: &Kind, flops: u64, bytes: u64, utilization: f64, fill: f64) -> f64 {
    let peak = if kind.tensor { gpu.f16_tensor_tflops } else { gpu.fp32_tflops } * 1e12;
    let compute = flops as f64 / utilization.max(1e-9) / (peak * kind.efficiency);
    let memory = bytes as f64 / (gpu.bandwidth_gbs * 1e9 * BW_EFFICIENCY);
    gpu.launch_us + 1e6 * compute.max(memory) / fill.max(1e-9)
}

/// Whether `gpu` could run variant `v` (its features, workgroup memory and invocations).
pub fn runs_on(gpu: &GpuSpec, v: &Variant) -> bool {
    let features_ok = !v.needs.features.contains(wgpu::Features::SUBGROUP) || gpu.subgroups;
    let coop_ok = v.needs.coop == 0 || gpu.coop_sizes.contains(&v.needs.coop);
    features_ok
        && coop_ok
        && v.needs.workgroup_bytes <= gpu.workgroup_memory_per_workgroup
        && v.needs.invocations <= 1024
}

/// The model's estimate of node `i` of `g` as if it ran `variant` (None: the node's kernel).
pub fn estimate_node(
    gpu: &GpuSpec,
    reflect: &mut Reflector,
    g: &Graph,
    i: usize,
    variant: Option<&Variant>,
) -> DispatchEstimate {
    let n: &Node = &g.nodes[i];
    let (shader, entry, workgroups, constants): (&Shader, &str, [u32; 3], &[(&str, f64)]) = match variant {
        Some(v) => (v.shader.unwrap_or(g.variants[&i].shader), v.entry, v.workgroups, &v.constants),
        None => (n.shader, n.entry, n.workgroups, &[]),
    };
    let declared = variant.map_or((0, 0), |v| (v.needs.invocations, v.needs.workgroup_bytes));
    // The module is the truth; a variant's declared needs stand in where it cannot be read.
    let (invocations, workgroup_bytes) = reflect.launch(shader, entry, constants).unwrap_or(declared);
    let kind = kind_of(variant);
    let utilization = variant.and_then(|v| v.tile).map_or(1.0, |t| t.utilization());
    let groups: u64 = workgroups.iter().map(|&w| w as u64).product();
    let f = fill(gpu, groups, resident_per_sm(gpu, invocations, workgroup_bytes, kind.registers));
    DispatchEstimate {
        kernel: format!("{}::{}", shader.name, entry),
        variant: variant.map(|v| v.name.clone()),
        layer: layer_of(&n.label),
        label: n.label.clone(),
        workgroups: groups,
        invocations,
        workgroup_bytes,
        tile_utilization: utilization,
        flops: n.cost.flops,
        bytes: n.cost.bytes,
        fill: f,
        kind: kind.name.to_string(),
        est_us: time_us(gpu, &kind, n.cost.flops, n.cost.bytes, utilization, f),
        candidates: vec![],
    }
}

/// Give every tunable node of `g` the candidate the model predicts fastest on `gpu` among those
/// the card can run (the default when none can); returns how many nodes changed kernel.
pub fn choose(g: &mut Graph, gpu: &GpuSpec, reflect: &mut Reflector) -> usize {
    let nodes: Vec<usize> = g.variants.keys().copied().collect();
    let mut changed = 0;
    for i in nodes {
        let t = &g.variants[&i];
        let best = t
            .candidates
            .iter()
            .enumerate()
            .filter(|(_, v)| runs_on(gpu, v))
            .map(|(k, v)| (k, estimate_node(gpu, reflect, g, i, Some(v)).est_us))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(0, |(k, _)| k);
        if best != t.chosen {
            changed += 1;
        }
        g.choose(i, best);
    }
    changed
}

/// The model's report of a graph: one estimate per dispatch, in graph order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub gpu_model: String,
    pub gpu: String,
    /// Sum of the dispatches' estimates, milliseconds.
    pub est_total_ms: f64,
    pub dispatches: Vec<DispatchEstimate>,
}

/// Choose every tunable node's variant for `gpu` ([`choose`]) and estimate each dispatch.
pub fn report(g: &mut Graph, gpu: &GpuSpec) -> Report {
    let mut reflect = Reflector::new();
    choose(g, gpu, &mut reflect);
    let dispatches: Vec<DispatchEstimate> = (0..g.nodes.len())
        .map(|i| {
            let Some(t) = g.variants.get(&i) else { return estimate_node(gpu, &mut reflect, g, i, None) };
            let candidates = t
                .candidates
                .iter()
                .map(|v| {
                    let e = estimate_node(gpu, &mut reflect, g, i, Some(v));
                    CandidateEstimate {
                        variant: v.name.clone(),
                        kernel: e.kernel,
                        runs: runs_on(gpu, v),
                        kind: e.kind,
                        tile_utilization: e.tile_utilization,
                        est_us: e.est_us,
                    }
                })
                .collect();
            let chosen = t.variant().clone();
            DispatchEstimate { candidates, ..estimate_node(gpu, &mut reflect, g, i, Some(&chosen)) }
        })
        .collect();
    Report {
        gpu_model: gpu.name.to_string(),
        gpu: gpu.full_name.to_string(),
        est_total_ms: dispatches.iter().map(|d| d.est_us).sum::<f64>() * 1e-3,
        dispatches,
    }
}

/// Whether a dispatch is a convolution pass (shaders conv.wgsl and conv_subgroup.wgsl).
pub fn is_conv(d: &DispatchEstimate) -> bool {
    d.kernel.starts_with("conv")
}

/// Totals of a report, for BENCHMARKS.md and the summary line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Totals {
    pub est_ms: f64,
    pub dispatches: usize,
    pub flops: u64,
    pub bytes: u64,
    /// FLOP-weighted mean tile utilisation of the conv dispatches.
    pub conv_utilization: f64,
    /// Lowest tile utilisation of a conv dispatch carrying more than 1% of the FLOPs.
    pub worst_conv_utilization: f64,
    /// Lowest tile utilisation of any conv dispatch.
    pub lowest_conv_utilization: f64,
}

impl Report {
    pub fn totals(&self) -> Totals {
        let flops: u64 = self.dispatches.iter().map(|d| d.flops).sum();
        let convs = || self.dispatches.iter().filter(|d| is_conv(d));
        let conv_flops: f64 = convs().map(|d| d.flops as f64).sum();
        let weighted: f64 = convs().map(|d| d.flops as f64 * d.tile_utilization).sum();
        Totals {
            est_ms: self.est_total_ms,
            dispatches: self.dispatches.len(),
            flops,
            bytes: self.dispatches.iter().map(|d| d.bytes).sum(),
            conv_utilization: if conv_flops > 0.0 { weighted / conv_flops } else { 1.0 },
            worst_conv_utilization: convs()
                .filter(|d| d.flops as f64 > 0.01 * flops as f64)
                .map(|d| d.tile_utilization)
                .fold(1.0, f64::min),
            lowest_conv_utilization: convs().map(|d| d.tile_utilization).fold(1.0, f64::min),
        }
    }

    /// The tables `profile --dry-run --gpu-model` prints: per dispatch, per kernel, per layer,
    /// then the estimated total. Every time in them is the model's estimate.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let total_us = (self.est_total_ms * 1e3).max(1e-9);
        let _ = writeln!(
            out,
            "GPU MODEL ESTIMATE for {} ({}): napkin math from the cost model, not a measurement",
            self.gpu, self.gpu_model
        );
        let dispatches: Vec<Sum> = self.dispatches.iter().map(|d| Sum::of(d, d.label.clone())).collect();
        for (title, rows) in
            [("dispatch (label)", dispatches), ("kernel", self.sums(true)), ("layer", self.sums(false))]
        {
            let _ = writeln!(
                out,
                "\n{title:<56} {:>14} {:>5} {:>10} {:>5} {:>7} {:>6} {:>5} {:>10} {:>10} {:>10} {:>6}",
                "variant", "calls", "workgroups", "inv", "wg B", "util", "fill", "MFLOP", "MB", "est us", "est%"
            );
            let mixed = |v: Option<u32>| v.map_or("mixed".to_string(), |v| v.to_string());
            for r in rows {
                let _ = writeln!(
                    out,
                    "{:<56} {:>14} {:>5} {:>10} {:>5} {:>7} {:>6.3} {:>5.2} {:>10.2} {:>10.3} {:>10.2} {:>6.2}",
                    r.name,
                    r.variant,
                    r.calls,
                    r.workgroups,
                    mixed(r.invocations),
                    mixed(r.workgroup_bytes),
                    r.utilization(),
                    r.fill(),
                    r.flops as f64 * 1e-6,
                    r.bytes as f64 * 1e-6,
                    r.est_us,
                    100.0 * r.est_us / total_us
                );
            }
        }
        let t = self.totals();
        let _ = writeln!(
            out,
            "\nestimated step total on {} (MODEL ESTIMATE, not measured): {:.3} ms; {} dispatches, {:.3} GFLOP, {:.3} GB moved; \
             conv tile utilisation {:.1}% FLOP-weighted, worst {:.1}% among conv dispatches over 1% of the FLOPs, lowest {:.1}% of any",
            self.gpu,
            t.est_ms,
            t.dispatches,
            t.flops as f64 * 1e-9,
            t.bytes as f64 * 1e-9,
            100.0 * t.conv_utilization,
            100.0 * t.worst_conv_utilization,
            100.0 * t.lowest_conv_utilization
        );
        if let Ok(g) = spec(&self.gpu_model) {
            let _ = writeln!(
                out,
                "model: time = launch {:.1} us + max(FLOPs / util / (peak x kind efficiency), bytes / ({:.0}% of {:.0} GB/s)) / fill; \
                 fill = workgroups / (waves x {} SMs x resident per SM); efficiencies per kind in src/gpu_model.rs (uncalibrated)",
                g.launch_us,
                100.0 * BW_EFFICIENCY,
                g.bandwidth_gbs,
                g.sms,
            );
        }
        out
    }

    /// Dispatches summed per kernel ("shader::entry@variant", as the measured profile keys
    /// them) or per layer, by estimated time, largest first.
    pub fn sums(&self, per_kernel: bool) -> Vec<Sum> {
        let mut m: BTreeMap<String, Sum> = BTreeMap::new();
        for d in &self.dispatches {
            let key = if per_kernel { d.kernel_key() } else { d.layer.clone() };
            match m.get_mut(&key) {
                Some(s) => s.add(d),
                None => {
                    m.insert(key.clone(), Sum::of(d, key));
                }
            }
        }
        let mut v: Vec<Sum> = m.into_values().collect();
        v.sort_by(|a, b| b.est_us.total_cmp(&a.est_us));
        v
    }
}

/// Dispatches of one kernel or layer, summed.
#[derive(Debug, Clone, PartialEq)]
pub struct Sum {
    pub name: String,
    /// The variant all of them run, or "mixed".
    pub variant: String,
    pub calls: usize,
    pub workgroups: u64,
    /// None when they differ.
    pub invocations: Option<u32>,
    pub workgroup_bytes: Option<u32>,
    pub flops: u64,
    useful_weighted: f64,
    fill_weighted: f64,
    pub bytes: u64,
    pub est_us: f64,
}

impl Sum {
    /// The sum of the one dispatch `d`, named `name`.
    fn of(d: &DispatchEstimate, name: String) -> Sum {
        let mut s = Sum {
            name,
            variant: d.variant.clone().unwrap_or_else(|| "-".into()),
            calls: 0,
            workgroups: 0,
            invocations: Some(d.invocations),
            workgroup_bytes: Some(d.workgroup_bytes),
            flops: 0,
            useful_weighted: 0.0,
            fill_weighted: 0.0,
            bytes: 0,
            est_us: 0.0,
        };
        s.add(d);
        s
    }

    fn add(&mut self, d: &DispatchEstimate) {
        if self.variant != d.variant.as_deref().unwrap_or("-") {
            self.variant = "mixed".into();
        }
        if self.invocations != Some(d.invocations) {
            self.invocations = None;
        }
        if self.workgroup_bytes != Some(d.workgroup_bytes) {
            self.workgroup_bytes = None;
        }
        self.calls += 1;
        self.workgroups += d.workgroups;
        self.flops += d.flops;
        self.useful_weighted += d.flops as f64 * d.tile_utilization;
        self.fill_weighted += d.est_us * d.fill;
        self.bytes += d.bytes;
        self.est_us += d.est_us;
    }

    /// FLOP-weighted mean tile utilisation (1.0 without FLOPs).
    pub fn utilization(&self) -> f64 {
        if self.flops == 0 {
            1.0
        } else {
            self.useful_weighted / self.flops as f64
        }
    }

    /// Time-weighted mean fill.
    pub fn fill(&self) -> f64 {
        self.fill_weighted / self.est_us.max(1e-12)
    }
}

/// What `profile --dry-run --gpu-model` prints for `g`: the variants chosen by the model, then
/// the estimate as tables and the memory line; or (`json`) one JSON object
/// `{"gpu_model", "gpu", "est_total_ms", "dispatches": [..]}`; or, given a measured trace, the
/// model beside it ([`compare`]).
pub fn dry_run(g: &mut Graph, gpu: &GpuSpec, json: bool, compare_trace: Option<&std::path::Path>) -> Result<String> {
    if let Some(trace) = compare_trace {
        return compare(g, gpu, trace);
    }
    let r = report(g, gpu);
    if json {
        return Ok(serde_json::to_string(&r)? + "\n");
    }
    let mut out = r.render();
    out.push_str(&crate::profile::memory_line(&crate::graph::plan_memory(g)));
    out.push('\n');
    Ok(out)
}

/// One dispatch of a measured trace (`profile --trace`): "shader::entry[@variant]", its label
/// and its time.
struct Measured {
    name: String,
    label: String,
    us: f64,
    /// The cost model's work as the measured run recorded it (None in a trace without it).
    work: Option<(u64, u64)>,
}

/// The dispatches of one iteration of a Chrome trace written by `profile --trace`, each with its
/// mean time over the trace's iterations.
fn read_trace(path: &std::path::Path) -> Result<Vec<Measured>> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the trace {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not JSON; pass the file `profile --trace` wrote", path.display()))?;
    let Some(events) = v["traceEvents"].as_array() else {
        bail!("{}: no traceEvents array; pass the file `profile --trace` wrote", path.display());
    };
    let mut iterations: BTreeMap<u64, Vec<Measured>> = BTreeMap::new();
    for e in events {
        let (Some(name), Some(label), Some(us), Some(iter)) =
            (e["name"].as_str(), e["args"]["label"].as_str(), e["dur"].as_f64(), e["args"]["iteration"].as_u64())
        else {
            bail!("{}: an event lacks name, args.label, args.iteration or dur: {e}", path.display());
        };
        let work = e["args"]["flops"].as_u64().zip(e["args"]["bytes"].as_u64());
        iterations.entry(iter).or_default().push(Measured { name: name.into(), label: label.into(), us, work });
    }
    let count = iterations.len();
    let mut runs = iterations.into_values();
    let Some(mut out) = runs.next() else { bail!("{}: the trace has no dispatches", path.display()) };
    for run in runs {
        if run.len() != out.len() || run.iter().zip(&out).any(|(a, b)| a.label != b.label) {
            bail!("{}: its iterations ran different dispatches", path.display());
        }
        for (m, r) in out.iter_mut().zip(run) {
            m.us += r.us;
        }
    }
    for m in &mut out {
        m.us /= count as f64;
    }
    Ok(out)
}

/// The model beside a measured run: `trace` (from `profile --trace` on a real card, same preset,
/// batch, size and --train as `g`) paired dispatch by dispatch with `g`'s nodes; the model
/// estimates each node on the variant the measured run used (so its efficiencies can be
/// calibrated), summed per measured kernel and per kernel kind, with the totals and the model's
/// own choices' total. What `tools/gpu_check.sh` prints on the GPU machine.
pub fn compare(g: &Graph, gpu: &GpuSpec, trace: &std::path::Path) -> Result<String> {
    let measured = read_trace(trace)?;
    if measured.len() != g.nodes.len() {
        bail!(
            "{}: {} dispatches per iteration, the planned graph has {}: profile the same --preset, --batch, --size and --train",
            trace.display(),
            measured.len(),
            g.nodes.len()
        );
    }
    let mut reflect = Reflector::new();
    // (calls, measured us, model us) per measured kernel and per kind.
    let mut kernels: BTreeMap<String, (usize, f64, f64)> = BTreeMap::new();
    let mut kinds: BTreeMap<String, (usize, f64, f64)> = BTreeMap::new();
    for (i, m) in measured.iter().enumerate() {
        let cost = g.nodes[i].cost;
        if m.work.is_some_and(|w| w != (cost.flops, cost.bytes)) {
            bail!(
                "{}: dispatch {i} '{}' did other work than the planned graph's ({:?} FLOPs and bytes, planned ({}, {})): profile the same --preset, --batch, --size and --train",
                trace.display(),
                m.label,
                m.work.unwrap_or_default(),
                cost.flops,
                cost.bytes
            );
        }
        if m.label != g.nodes[i].label {
            bail!(
                "{}: dispatch {i} is '{}', the planned graph's is '{}': profile the same --preset, --batch, --size and --train",
                trace.display(),
                m.label,
                g.nodes[i].label
            );
        }
        let variant = match (m.name.split_once('@'), g.variants.get(&i)) {
            (Some((_, name)), Some(t)) => match t.candidates.iter().find(|v| v.name == name) {
                Some(v) => Some(v.clone()),
                None => bail!(
                    "{}: dispatch {i} '{}' ran variant '{name}', which the graph does not offer",
                    trace.display(),
                    m.label
                ),
            },
            (None, None) => None,
            _ => bail!(
                "{}: dispatch {i} '{}' ({}) does not match the planned node's variants",
                trace.display(),
                m.label,
                m.name
            ),
        };
        let e = estimate_node(gpu, &mut reflect, g, i, variant.as_ref());
        for (map, key) in [(&mut kernels, m.name.clone()), (&mut kinds, e.kind.clone())] {
            let r = map.entry(key).or_insert((0, 0.0, 0.0));
            r.0 += 1;
            r.1 += m.us;
            r.2 += e.est_us;
        }
    }
    let own = report(&mut g.clone(), gpu).est_total_ms;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "GPU MODEL ({}, an ESTIMATE) beside the MEASURED trace {} (mean of its iterations): the model estimates the variants the measured run chose\n",
        gpu.name,
        trace.display()
    );
    let table = |out: &mut String, title: &str, rows: BTreeMap<String, (usize, f64, f64)>| {
        let _ = writeln!(
            out,
            "{title:<60} {:>6} {:>12} {:>12} {:>15}",
            "calls", "measured ms", "model ms", "measured/model"
        );
        let mut rows: Vec<_> = rows.into_iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        for (name, (calls, m, e)) in rows {
            let _ =
                writeln!(out, "{name:<60} {calls:>6} {:>12.3} {:>12.3} {:>15.3}", m * 1e-3, e * 1e-3, m / e.max(1e-12));
        }
        out.push('\n');
    };
    let (m_total, e_total) = kernels.values().fold((0.0, 0.0), |(a, b), r| (a + r.1, b + r.2));
    table(&mut out, "kernel (measured)", kernels);
    table(&mut out, "kind (divide its efficiency by measured/model to calibrate)", kinds);
    let _ = writeln!(
        out,
        "total: measured {:.3} ms, model {:.3} ms for the same variants (measured/model {:.3}), model {:.3} ms with its own choices",
        m_total * 1e-3,
        e_total * 1e-3,
        m_total / e_total.max(1e-12),
        own
    );
    Ok(out)
}
